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

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        logits = self.model(tokens, mask, solution_start=solution_start)
        return jax.nn.sigmoid(jnp.take_along_axis(logits, positions, axis=1))

    def shares_backbone(self, policy) -> bool:
        """Whether the value head sits on `policy`'s own backbone (NNX shares the module) and can be read from
        the sampler's hidden states alone (a model that reads the likelihood needs the tokens too)."""
        return self.model.transformer is policy.transformer and not self.model.likelihood

    def from_hidden(self, hidden: Float[Array, "... E"]) -> Float[Array, "..."]:
        """Values from the backbone's final hidden states (the policy's, when the backbone is shared)."""
        return jax.nn.sigmoid(self.model.logits_from_hidden(hidden))

    def extend_scores(self, tokens: Int[Array, "B L"], length: Int[Array, " B"], candidates: Int[Array, "B K S"],
                      candidate_len: Int[Array, "B K"], width: int | None = None,
                      prompt_len: Int[Array, " B"] | None = None) -> Float[Array, "B K"]:
        """As `Verifier.extend_scores`, at the cost of one pass over each partial solution plus K x S tokens: the
        partial solution goes into a KV cache once, and each candidate runs on top of a copy of it."""
        b, k, s = candidates.shape
        model = self.model
        prefix, prefix_mask = right_align(tokens, length, 0, width)
        cache = KVCache.init(model.config, b, prefix.shape[1] + s, dtype=model.transformer.dtype)
        prefix_hidden, cache = model.transformer(prefix, prefix_mask, cache=cache)
        lens = candidate_len.reshape(b * k)
        mask = (jnp.arange(s)[None, :] < lens[:, None]).astype(jnp.int32)
        flat = candidates.reshape(b * k, s)
        hidden, _ = model.transformer(flat, mask, cache=cache.repeat_rows(k))
        prefix_min = minimum = None
        if model.likelihood:
            if prompt_len is None:
                raise ValueError("a value model that reads the LM's likelihood needs the rows' prompt_len")
            # right_align keeps a row's last `prefix.shape[1]` tokens at the right: token i sits at column
            # i + shift (a negative shift: the row was cut, and its solution start with it if before the cut)
            shift = prefix.shape[1] - length
            prefix_min = model.likelihood_minimum(prefix_hidden, prefix, prefix_mask, prompt_len + shift)
            # a candidate's first token is predicted by the prefix's last hidden state, and every token counts
            minimum = model.likelihood_minimum(hidden, flat, mask, jnp.zeros((b * k,), jnp.int32),
                                               previous_hidden=jnp.repeat(prefix_hidden[:, -1], k, axis=0),
                                               initial=jnp.repeat(prefix_min[:, -1], k))
        last_min = None if prefix_min is None else prefix_min[:, -1]
        prefix_logits = model.logits_from_hidden(prefix_hidden[:, -1], last_min)
        logits = model.logits_from_hidden(hidden, minimum)
        last = jnp.take_along_axis(logits, jnp.maximum(lens - 1, 0)[:, None], axis=1)[:, 0]
        last = jnp.where(lens > 0, last, jnp.repeat(prefix_logits, k))
        return jax.nn.sigmoid(last).reshape(b, k)

    def extend_cost(self, length: Int[Array, " B"], candidate_len: Int[Array, "B K"],
                    width: int | None = None) -> Int[Array, " B"]:
        """Tokens `extend_scores` reads per row: the partial solution once, then the K candidates."""
        kept = length if width is None else jnp.minimum(length, width)
        return kept + jnp.sum(candidate_len, axis=1)


register_verifier("prm", ValueVerifier)
register_verifier("orm", lambda model: ValueVerifier(model, aggregation="last"))
register_verifier("bradley_terry", lambda model: ValueVerifier(model, aggregation="last"))  # trained on pairs
