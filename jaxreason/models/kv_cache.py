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

    def num_real_tokens(self) -> Int[Array, "B"]:
        return jnp.sum(self.mask, axis=1, dtype=jnp.int32)

    def take_rows(self, rows: Int[Array, "R"]) -> KVCache:
        """The cache of rows `rows` (gathered, in that order)."""
        return self.replace(k=self.k[:, rows], v=self.v[:, rows], mask=self.mask[rows])

    def repeat_rows(self, times: int) -> KVCache:
        """Each row repeated `times` times in place (row b * times + i is copy i of row b)."""
        return self.replace(k=jnp.repeat(self.k, times, axis=1), v=jnp.repeat(self.v, times, axis=1),
                            mask=jnp.repeat(self.mask, times, axis=0))
