"""Key/value cache for batched decoding: fixed-size slot buffers, written left to right for every row."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from jaxreason.models.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values of the tokens seen so far.

    Every row writes its i-th call's tokens at the same slots `[index, index + T)`; rows of different
    lengths are handled by `mask` (left-padded prompts leave unmasked gaps at the start).

    Attributes:
      k: keys, [L, B, num_kv_heads, S, head_dim] (heads before slots: each head's keys are one contiguous
        [S, head_dim] matrix, which the decode step's small per-row matmuls read fastest).
      v: values, [L, B, num_kv_heads, S, head_dim].
      mask: [B, S], True where a slot holds a real token.
      index: [], the next slot to write.
    """

    k: Float[Array, "L B K S D"]
    v: Float[Array, "L B K S D"]
    mask: Bool[Array, "B S"]
    index: Int[Array, ""]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def num_real_tokens(self) -> Int[Array, " B"]:
        return jnp.sum(self.mask, axis=1, dtype=jnp.int32)

    def take_rows(self, rows: Int[Array, " R"]) -> KVCache:
        """The cache of rows `rows` (gathered, in that order)."""
        return self.replace(k=self.k[:, rows], v=self.v[:, rows], mask=self.mask[rows])

    def repeat_rows(self, times: int) -> KVCache:
        """Each row repeated `times` times in place (row b * times + i is copy i of row b)."""
        return self.replace(k=jnp.repeat(self.k, times, axis=1), v=jnp.repeat(self.v, times, axis=1),
                            mask=jnp.repeat(self.mask, times, axis=0))


@struct.dataclass
class PrefixGrid:
    """Where each row of a decoding batch sits among the samples of a shared prefix (`Transformer(prefix=...)`).

    Slot p * R + r is sample r of prefix row p. Without a grid a batch fills every slot in order (B = P x R);
    a decode that has dropped its finished rows keeps its live ones in their slots, so attention still reads
    each prefix row once for all of its samples instead of once per row.

    Attributes:
      rows: [P, R] the batch row in each slot (B where the slot is empty).
      slots: [B] each batch row's slot.
    """

    rows: Int[Array, "P R"]
    slots: Int[Array, " B"]

    @classmethod
    def of(cls, slots: Int[Array, " B"], num_prefix_rows: int, samples: int) -> PrefixGrid:
        """The grid of batch rows at `slots` (distinct, each below num_prefix_rows x samples)."""
        b = slots.shape[0]
        rows = jnp.full((num_prefix_rows * samples,), b, jnp.int32).at[slots].set(jnp.arange(b, dtype=jnp.int32))
        return cls(rows=rows.reshape(num_prefix_rows, samples), slots=slots.astype(jnp.int32))

    @property
    def samples(self) -> int:
        return self.rows.shape[1]

    def prefix_rows(self) -> Int[Array, " B"]:
        """The prefix row each batch row continues."""
        return self.slots // self.samples

    def to_grid(self, x: Array) -> Array:
        """[B, ...] -> [P R, ...]: each slot's row of `x` (zeros in empty slots)."""
        return jnp.take(x, self.rows.reshape(-1), axis=0, mode="fill", fill_value=0)

    def from_grid(self, x: Array) -> Array:
        """[P R, ...] -> [B, ...]: each batch row's slot of `x`."""
        return x[self.slots]
