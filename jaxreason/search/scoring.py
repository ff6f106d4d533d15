"""PRM / ORM scores of partial or complete solutions, as used by search and the test-time baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.value_head import ValueModel


def prefix_values(prm: ValueModel, tokens: Int[Array, "B L"], mask: Int[Array, "B L"]) -> Float[Array, "B"]:
    """The value in [0, 1] of each left-padded prefix: the head read at its last token."""
    return jax.nn.sigmoid(prm(tokens, mask)[:, -1])


def right_align(tokens: Int[Array, "B L"], length: Int[Array, "B"], pad_id: int = 0):
    """Left-aligned rows (real tokens first) -> left-padded rows (real tokens last) and their mask."""
    width = tokens.shape[1]
    shifted = jax.vmap(lambda row, n: jnp.roll(row, width - n))(tokens, length)
    mask = jnp.arange(width)[None, :] >= (width - length)[:, None]
    return jnp.where(mask, shifted, pad_id), mask.astype(jnp.int32)
