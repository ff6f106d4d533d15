"""Generative verifiers (GenRM; Zhang et al. 2024, arXiv 2408.15240): the policy's own architecture asked whether a
solution is right, scored as P(Yes) at the next token (reward modelling as next-token prediction,
`jaxreason.train.losses.p_yes`).

Direct: the value of the partial solution that ends at a position is read by appending the verification question
(e.g. "\\nIs the answer correct? (Yes/No)") right after that position and taking the softmax probability of the
Yes token at the slot after it: one forward pass per (row, position), B * S rows of T + Q tokens.
CoT: the verifier first writes r rationales of its own after the solution, and P(Yes) after each is averaged.
Their training rows are `jaxreason.verifiers.generative_data`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.llama import CausalLM
from jaxreason.sampling.generate import SamplingConfig, sample
from jaxreason.train.losses import p_yes
from jaxreason.verifiers.base import AGGREGATIONS, Verifier, register_verifier
from jaxreason.verifiers.positions import score_position


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

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        del solution_start  # the question is asked after the text as it stands, prompt and all
        b, s = positions.shape
        ends = positions.reshape(b * s) + 1  # the question starts right after the position
        return ask(self.model, jnp.repeat(tokens, s, axis=0), jnp.repeat(mask, s, axis=0), ends, self.question,
                   self.yes_id).reshape(b, s)


class CoTGenerativeVerifier(GenerativeVerifier):
    """GenRM-CoT: for each partial solution the model first writes `num_rationales` = r rationales of its own
    (after `intro_ids`, sampled with `sampling` until an EOS), is then asked `question_ids`, and the score is the
    mean of the r P(Yes) (majority voting over rationales, as the paper's). The rationales are drawn from keys
    fixed by `seed` and the row's place in the call, so a score does not change between calls with one layout.

    It judges whole solutions: `scored` (best-of-N, rewards) reads the verdict after each row's last step only
    and gives it to every step and to the prompt, since r rationales at each of S + 1 positions would cost S + 1
    times more; `values_at` still reads any position asked for."""

    def __init__(self, model: CausalLM, question_ids: Sequence[int], yes_id: int, no_id: int, *,
                 intro_ids: Sequence[int], num_rationales: int, sampling: SamplingConfig, eos_ids: Sequence[int],
                 pad_id: int, seed: int = 0, aggregation: str = "last"):
        super().__init__(model, question_ids, yes_id, no_id, aggregation)
        if aggregation != "last":
            raise ValueError(f"a CoT verifier judges whole solutions: aggregation must be 'last', got {aggregation!r}")
        if num_rationales < 1:
            raise ValueError(f"num_rationales must be >= 1, got {num_rationales}")
        if not eos_ids:
            raise ValueError("a CoT verifier needs the eos_ids that end a rationale")
        self.intro = tuple(int(i) for i in intro_ids)
        self.num_rationales, self.sampling, self.seed = int(num_rationales), sampling, int(seed)
        self.eos_ids, self.pad_id = tuple(int(i) for i in eos_ids), int(pad_id)

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        del solution_start  # the question is asked after the text as it stands, prompt and all
        (b, t), s, r = tokens.shape, positions.shape[1], self.num_rationales
        ends = positions.reshape(b * s) + 1
        # each partial solution left-padded to width T (the sampler's prompt layout), then the intro
        source = ends[:, None] - t + jnp.arange(t)[None, :]
        inside = source >= 0
        take = lambda x: jnp.take_along_axis(jnp.repeat(x, s, axis=0), jnp.maximum(source, 0), axis=1)
        intro = jnp.broadcast_to(jnp.asarray(self.intro, tokens.dtype), (b * s, len(self.intro)))
        prompt = jnp.concatenate([jnp.where(inside, take(tokens), self.pad_id), intro], axis=1)
        prompt_mask = jnp.concatenate([jnp.where(inside, take(mask), 0), jnp.ones_like(intro)], axis=1)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.seed), i))(jnp.arange(b * s * r))
        out = sample(self.model, prompt, prompt_mask, keys, self.sampling, eos_ids=self.eos_ids, pad_id=self.pad_id,
                     samples_per_prompt=r)
        n = out.tokens.shape[1]
        rows = jnp.concatenate([jnp.repeat(prompt, r, axis=0), out.tokens], axis=1)
        written = (jnp.arange(n)[None, :] < out.lengths[:, None]).astype(prompt_mask.dtype)
        rows_mask = jnp.concatenate([jnp.repeat(prompt_mask, r, axis=0), written], axis=1)
        scores = ask(self.model, rows, rows_mask, prompt.shape[1] + out.lengths, self.question, self.yes_id)
        return scores.reshape(b, s, r).mean(axis=-1)


    def scored(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], step_ends: Int[Array, "B S"],
               prompt_len: Int[Array, " B"]) -> tuple[Float[Array, "B S"], Float[Array, " B"], Float[Array, " B"]]:
        last = jnp.max(step_ends, axis=1)  # one past the last step's last token
        verdict = self.values_at(tokens, mask, score_position(jnp.maximum(last, 1))[:, None])[:, 0]
        return jnp.where(step_ends > 0, verdict[:, None], 0.0), verdict, verdict


def ask(model: CausalLM, rows: Int[Array, "R W"], mask: Int[Array, "R W"], ends: Int[Array, " R"],
        question: Sequence[int], yes_id: int) -> Float[Array, " R"]:
    """P(`yes_id`) right after `question`, asked at each row's column `ends` (what the row holds from there on
    is dropped): the verdict slot is the token after the question, predicted by the logits at its last token."""
    q = len(question)
    width = rows.shape[1] + q
    column = jnp.arange(width)[None, :]
    ends = ends[:, None]
    rows, mask = jnp.pad(rows, ((0, 0), (0, q))), jnp.pad(mask, ((0, 0), (0, q)))
    asked = (column >= ends) & (column < ends + q)
    question_row = jnp.asarray(question, rows.dtype)[jnp.clip(column - ends, 0, q - 1)]
    rows = jnp.where(asked, question_row, jnp.where(column < ends, rows, 0))
    mask = jnp.where(asked, 1, jnp.where(column < ends, mask, 0)).astype(jnp.int32)
    return p_yes(model(rows, mask), (ends + q)[:, 0], yes_id)


register_verifier("generative", lambda model, question_ids, yes_id, no_id, **options:
                  GenerativeVerifier(model, question_ids, yes_id, no_id, **options))
register_verifier("generative_cot", lambda model, question_ids, yes_id, no_id, **options:
                  CoTGenerativeVerifier(model, question_ids, yes_id, no_id, **options))
