"""Packing a padded batch's real tokens together for the position-wise parts of a forward pass.

A prefill of rows of very different lengths, padded to the longest, spends most of its matmuls on padding:
a search's expansion prefills partial solutions of 1 to 6 steps side by side, most of them padding. The
projections, the MLP and the norms treat every token alone, so they can run on the real tokens only, gathered
into N slots (N static, chosen by the caller to hold them); attention, which mixes tokens within a row, runs in
the padded [B, T] layout, scattered back.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int


@struct.dataclass
class Packing:
    """Where each of N packed slots comes from in a [B, T] batch.

    Attributes:
      index: [N] flat index b * T + t of each packed token, real tokens in row-major order; B * T for an
        unused slot (it gathers zeros and scatters nowhere).
      shape: (B, T), static.
    """

    index: Int[Array, " N"]
    shape: tuple[int, int] = struct.field(pytree_node=False)

    @classmethod
    def of(cls, mask: Int[Array, "B T"], capacity: int) -> Packing:
        """The real tokens of `mask` in `capacity` slots; any past the first `capacity` are left out."""
        b, t = mask.shape
        (index,) = jnp.nonzero(mask.reshape(-1), size=capacity, fill_value=b * t)
        return cls(index=index.astype(jnp.int32), shape=(b, t))

    def pack(self, x: Array) -> Array:
        """[B, T, ...] -> [N, ...]: the packed tokens' entries (zeros in unused slots)."""
        b, t = self.shape
        return jnp.take(x.reshape(b * t, *x.shape[2:]), self.index, axis=0, mode="fill", fill_value=0)

    def unpack(self, x: Array) -> Array:
        """[N, ...] -> [B, T, ...]: each packed entry back at its token, zeros at the tokens left out."""
        b, t = self.shape
        flat = jnp.zeros((b * t, *x.shape[1:]), x.dtype).at[self.index].set(x, mode="drop")
        return flat.reshape(b, t, *x.shape[1:])
