"""A generative verifier (GenRM, direct): the policy's own architecture asked whether a solution is right, scored
as P(Yes) at the next token (reward modelling as next-token prediction, `jaxreason.train.losses.p_yes`).

The value of the partial solution that ends at a position is read by appending the verification question
(e.g. "\\nIs the answer correct? (Yes/No) ") right after that position and taking the softmax probability of the
Yes token at the slot after it: one forward pass per (row, position), B * S rows of T + Q tokens, so it serves
best-of-N and outcome scoring ("last") more cheaply than a step-by-step search.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.llama import CausalLM
from jaxreason.train.losses import p_yes
from jaxreason.verifiers.base import AGGREGATIONS, Verifier, register_verifier


class GenerativeVerifier(Verifier):
    """`model` asked `question_ids` after a solution; its score is P(`yes_id`) under the full softmax."""

    def __init__(self, model: CausalLM, question_ids: Sequence[int], yes_id: int, no_id: int,
                 aggregation: str = "last"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        if not question_ids:
            raise ValueError("a generative verifier needs a verification question (question_ids is empty)")
        vocab = model.config.vocab_size
        if not (0 <= yes_id < vocab and 0 <= no_id < vocab) or yes_id == no_id:
            raise ValueError(f"yes_id {yes_id} and no_id {no_id} must be two different ids below the vocabulary "
                             f"size {vocab}")
        self.model = model
        self.question = tuple(int(i) for i in question_ids)
        self.yes_id, self.no_id, self.aggregation = int(yes_id), int(no_id), aggregation

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"],
                  positions: Int[Array, "B S"]) -> Float[Array, "B S"]:
        b, t = tokens.shape
        s, q = positions.shape[1], len(self.question)
        width = t + q
        column = jnp.arange(width)[None, :]
        ends = positions.reshape(b * s, 1) + 1  # the question starts right after the position
        rows = jnp.repeat(jnp.pad(tokens, ((0, 0), (0, q))), s, axis=0)  # [B*S, T+Q]
        kept = jnp.repeat(jnp.pad(mask, ((0, 0), (0, q))), s, axis=0)
        question = jnp.asarray(self.question, rows.dtype)
        asked = (column >= ends) & (column < ends + q)
        rows = jnp.where(asked, question[jnp.clip(column - ends, 0, q - 1)], jnp.where(column < ends, rows, 0))
        rows_mask = jnp.where(asked, 1, jnp.where(column < ends, kept, 0)).astype(jnp.int32)
        # the Yes/No slot is the token after the question, predicted by the logits at its last token
        return p_yes(self.model(rows, rows_mask), (ends + q)[:, 0], self.yes_id).reshape(b, s)


register_verifier("generative", lambda model, question_ids, yes_id, no_id, **options:
                  GenerativeVerifier(model, question_ids, yes_id, no_id, **options))
