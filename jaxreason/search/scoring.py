"""PRM / ORM scores of partial or complete solutions, as used by search and the test-time baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.kv_cache import KVCache
from jaxreason.models.value_head import ValueModel


def prefix_values(prm: ValueModel, tokens: Int[Array, "B L"], mask: Int[Array, "B L"]) -> Float[Array, "B"]:
    """The value in [0, 1] of each left-padded prefix: the head read at its last token."""
    return jax.nn.sigmoid(prm(tokens, mask)[:, -1])


def candidate_values(
    prm: ValueModel,
    prefix: Int[Array, "B P"],
    prefix_mask: Int[Array, "B P"],
    candidates: Int[Array, "B K S"],
    candidate_len: Int[Array, "B K"],
) -> Float[Array, "B K"]:
    """The value in [0, 1] of each left-padded prefix followed by each of its K left-aligned candidates.

    The prefix is run once into a KV cache and the K candidates (S tokens each) on top of copies of it, so
    scoring K extensions costs one prefix pass plus K x S tokens instead of K full-width passes. Equals
    `prefix_values` of the concatenated sequences (up to float rounding); a candidate of length 0 gets the
    prefix's own value.
    """
    b, k, s = candidates.shape
    cache = KVCache.init(prm.config, b, prefix.shape[1] + s, dtype=prm.transformer.dtype)
    prefix_logits, cache = prm(prefix, prefix_mask, cache=cache)
    lens = candidate_len.reshape(b * k)
    mask = (jnp.arange(s)[None, :] < lens[:, None]).astype(jnp.int32)
    logits, _ = prm(candidates.reshape(b * k, s), mask, cache=cache.repeat_rows(k))
    last = jnp.take_along_axis(logits, jnp.maximum(lens - 1, 0)[:, None], axis=1)[:, 0]
    last = jnp.where(lens > 0, last, jnp.repeat(prefix_logits[:, -1], k))
    return jax.nn.sigmoid(last).reshape(b, k)


def right_align(tokens: Int[Array, "B L"], length: Int[Array, "B"], pad_id: int = 0, width: int | None = None,
                start: Int[Array, "B"] | int = 0):
    """Left-aligned rows (real tokens first) -> left-padded rows (real tokens last) and their mask.

    `width` (default L) is the output width; a row longer than it keeps its last `width` tokens. Only the
    tokens from `start` on (per row; e.g. the steps after a prompt) are kept.
    """
    width = tokens.shape[1] if width is None else width
    source = length[:, None] - width + jnp.arange(width)[None, :]  # [B, width] index into each row
    mask = source >= jnp.reshape(start, (-1, 1))
    shifted = jnp.take_along_axis(tokens, jnp.maximum(source, 0), axis=1)
    return jnp.where(mask, shifted, pad_id), mask.astype(jnp.int32)
