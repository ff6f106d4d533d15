"""Value-head verifiers: a PRM or an ORM is a `ValueModel` read at score positions.

A PRM is trained on per-step targets and an ORM on one target at the solution's end; both read
sigmoid(head(hidden)) at `score_position`, so one class serves both: an ORM is a `ValueVerifier` with
aggregation "last". Scoring K candidate steps runs the partial solution once into a KV cache and the K
candidates on top of it, and a value model that shares the policy's backbone is read straight from the
sampler's hidden states (`from_hidden`), with no pass of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.kv_cache import KVCache
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.alignment import right_align
from jaxreason.verifiers.base import AGGREGATIONS, Verifier, register_verifier


class ValueVerifier(Verifier):
    """A `ValueModel` (PRM or ORM) as a verifier."""

    def __init__(self, model: ValueModel, aggregation: str = "last"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        self.model = model
        self.aggregation = aggregation

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"],
                  positions: Int[Array, "B S"]) -> Float[Array, "B S"]:
        logits = self.model(tokens, mask)
        return jax.nn.sigmoid(jnp.take_along_axis(logits, positions, axis=1))

    def shares_backbone(self, policy) -> bool:
        """Whether the value head sits on `policy`'s own backbone (NNX shares the module)."""
        return self.model.transformer is policy.transformer

    def from_hidden(self, hidden: Float[Array, "... E"]) -> Float[Array, "..."]:
        """Values from the backbone's final hidden states (the policy's, when the backbone is shared)."""
        return jax.nn.sigmoid(self.model.logits_from_hidden(hidden))

    def extend_scores(self, tokens: Int[Array, "B L"], length: Int[Array, " B"], candidates: Int[Array, "B K S"],
                      candidate_len: Int[Array, "B K"], width: int | None = None) -> Float[Array, "B K"]:
        """As `Verifier.extend_scores`, at the cost of one pass over each partial solution plus K x S tokens: the
        partial solution goes into a KV cache once, and each candidate runs on top of a copy of it."""
        b, k, s = candidates.shape
        prefix, prefix_mask = right_align(tokens, length, 0, width)
        cache = KVCache.init(self.model.config, b, prefix.shape[1] + s, dtype=self.model.transformer.dtype)
        prefix_logits, cache = self.model(prefix, prefix_mask, cache=cache)
        lens = candidate_len.reshape(b * k)
        mask = (jnp.arange(s)[None, :] < lens[:, None]).astype(jnp.int32)
        logits, _ = self.model(candidates.reshape(b * k, s), mask, cache=cache.repeat_rows(k))
        last = jnp.take_along_axis(logits, jnp.maximum(lens - 1, 0)[:, None], axis=1)[:, 0]
        last = jnp.where(lens > 0, last, jnp.repeat(prefix_logits[:, -1], k))
        return jax.nn.sigmoid(last).reshape(b, k)

    def extend_cost(self, length: Int[Array, " B"], candidate_len: Int[Array, "B K"],
                    width: int | None = None) -> Int[Array, " B"]:
        """Tokens `extend_scores` reads per row: the partial solution once, then the K candidates."""
        kept = length if width is None else jnp.minimum(length, width)
        return kept + jnp.sum(candidate_len, axis=1)


register_verifier("prm", ValueVerifier)
register_verifier("orm", lambda model: ValueVerifier(model, aggregation="last"))
register_verifier("bradley_terry", lambda model: ValueVerifier(model, aggregation="last"))  # trained on pairs
