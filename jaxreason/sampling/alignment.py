"""Moving a row's real tokens between the two padded layouts: left-aligned (a search node's tokens, then
padding) and left-padded (padding, then the tokens: what a prefill on top of a cache takes)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int


def right_align(tokens: Int[Array, "B L"], length: Int[Array, " B"], pad_id: int = 0, width: int | None = None,
                start: Int[Array, " B"] | int = 0):
    """Left-aligned rows (real tokens first) -> left-padded rows (real tokens last) and their mask.

    `width` (default L) is the output width; a row longer than it keeps its last `width` tokens. Only the
    tokens from `start` on (per row; e.g. the steps after a prompt) are kept.
    """
    width = tokens.shape[1] if width is None else width
    source = length[:, None] - width + jnp.arange(width)[None, :]  # [B, width] index into each row
    mask = source >= jnp.reshape(start, (-1, 1))
    shifted = jnp.take_along_axis(tokens, jnp.maximum(source, 0), axis=1)
    return jnp.where(mask, shifted, pad_id), mask.astype(jnp.int32)
