"""The verifier interface: one protocol for every scorer of solutions (PRM, ORM, DPO verifier, generative
verifier, reward model), and how step scores make a solution's score.

A verifier is an NNX module, so it enters jitted programs (best-of-N scoring, the search) as a plain pytree
through `nnx.split`. Its one primitive is `values_at`: the value in [0, 1] of the partial solution that ends
at each given token. Everything else derives from it through `score_position`:

- `step_scores`: the score of each step of right-padded rows (prompt, then solution), read at the steps'
  last tokens;
- `scores`: the solutions' scores, the step scores combined by `aggregation` ("last": the last step's, as
  ReST-MCTS* and an ORM read it; "min" and "product" over the steps, as PRM best-of-N often does);
- `extend_scores`: the step score of each of K candidate steps appended to a partial solution (the search's
  node values); subclasses override it with something cheaper than scoring every concatenation anew.

A new verifier is one subclass that implements `values_at` (and `extend_scores` when it can do better) and
one `register_verifier` call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxreason.verifiers.positions import score_position

AGGREGATIONS = ("last", "min", "product")


def aggregate(step_scores: Float[Array, "B S"], valid: Bool[Array, "B S"], how: str) -> Float[Array, " B"]:
    """Solution scores from step scores; steps where `valid` is False are left out (a row with none scores 1
    under "min" and "product", 0 under "last")."""
    if how == "last":
        last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        found = jnp.take_along_axis(step_scores, last[:, None], axis=1)[:, 0]
        return jnp.where(jnp.any(valid, axis=1), found, 0.0)
    if how == "min":
        return jnp.min(jnp.where(valid, step_scores, 1.0), axis=1)
    if how == "product":
        return jnp.prod(jnp.where(valid, step_scores, 1.0), axis=1)
    raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")


def combine(previous: Float[Array, "..."], step: Float[Array, "..."], how: str) -> Float[Array, "..."]:
    """The running form of `aggregate`: a partial solution's score after one more step whose score is `step`,
    from its score before it (`initial_score(how)` before the first step)."""
    if how == "last":
        return step
    if how == "min":
        return jnp.minimum(previous, step)
    if how == "product":
        return previous * step
    raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")


def initial_score(how: str) -> float:
    """What `combine` starts from: the identity of the aggregation."""
    return 0.0 if how == "last" else 1.0


class Verifier(nnx.Module):
    """Scores complete or partial solutions in [0, 1]. Subclasses implement `values_at`.

    Attributes:
      aggregation: how step scores make a solution's score (`AGGREGATIONS`); static.
    """

    aggregation: str = "last"

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        """The value in [0, 1] of each row's tokens up to and including each position (any padding layout).
        `solution_start` [B]: the column of each row's first solution token (the tokens before it are the
        prompt), for verifiers that treat the two apart; None where the caller does not know it."""
        raise NotImplementedError

    def step_scores(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], step_ends: Int[Array, "B S"],
                    prompt_len: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        """Each step's score; rows are right-padded (prompt, then solution from column `prompt_len`), step_ends
        one past each step's last token, 0 for no step (that step's score is 0)."""
        scores = self.values_at(tokens, mask, score_position(jnp.maximum(step_ends, 1)), prompt_len)
        return jnp.where(step_ends > 0, scores, 0.0)

    def scores(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], step_ends: Int[Array, "B S"],
               prompt_len: Int[Array, " B"] | None = None) -> Float[Array, " B"]:
        """Each solution's score: its step scores under `aggregation`."""
        return aggregate(self.step_scores(tokens, mask, step_ends, prompt_len), step_ends > 0, self.aggregation)

    def scored(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], step_ends: Int[Array, "B S"],
               prompt_len: Int[Array, " B"]) -> tuple[Float[Array, "B S"], Float[Array, " B"], Float[Array, " B"]]:
        """`step_scores`, `scores` and the value of each row's prompt alone (its first `prompt_len` tokens), from
        one `values_at` call."""
        positions = jnp.concatenate([score_position(jnp.maximum(step_ends, 1)), prompt_len[:, None] - 1], axis=1)
        values = self.values_at(tokens, mask, positions, prompt_len)
        steps = jnp.where(step_ends > 0, values[:, :-1], 0.0)
        return steps, aggregate(steps, step_ends > 0, self.aggregation), values[:, -1]

    def extend_scores(self, tokens: Int[Array, "B L"], length: Int[Array, " B"], candidates: Int[Array, "B K S"],
                      candidate_len: Int[Array, "B K"], width: int | None = None,
                      prompt_len: Int[Array, " B"] | None = None) -> Float[Array, "B K"]:
        """The step score of each left-aligned candidate appended to each left-aligned partial solution
        (`tokens` padded after `length`, its prompt its first `prompt_len` tokens); a candidate of length 0 gets
        the partial solution's own last value. `width` (static; default L): every partial solution fits in that
        many tokens (its last ones are kept).

        This default scores every concatenation in full: B * K rows of width + S tokens.
        """
        if width is not None and width < tokens.shape[1]:
            start = jnp.maximum(length - width, 0)
            tokens = jax.vmap(lambda row, s0: jax.lax.dynamic_slice(row, (s0,), (width,)))(tokens, start)
            length = length - start
            prompt_len = None if prompt_len is None else prompt_len - start
        b, k, s = candidates.shape
        width = tokens.shape[1] + s
        rows = jnp.repeat(jnp.pad(tokens, ((0, 0), (0, s))), k, axis=0)  # [B*K, L+S]
        lens, flat = jnp.repeat(length, k), candidates.reshape(b * k, s)
        cand_len = candidate_len.reshape(b * k)
        column = jnp.arange(width)[None, :]
        offset = jnp.clip(column - lens[:, None], 0, s - 1)
        inside = (column >= lens[:, None]) & (column < (lens + cand_len)[:, None])
        rows = jnp.where(inside, jnp.take_along_axis(flat, offset, axis=1), rows)
        end = lens + cand_len
        mask = (column < end[:, None]).astype(jnp.int32)
        starts = None if prompt_len is None else jnp.repeat(prompt_len, k)
        values = self.values_at(rows, mask, score_position(jnp.maximum(end, 1))[:, None], starts)[:, 0]
        return values.reshape(b, k)

    def extend_cost(self, length: Int[Array, " B"], candidate_len: Int[Array, "B K"],
                    width: int | None = None) -> Int[Array, " B"]:
        """Tokens `extend_scores` reads per row: each of the K concatenations in full."""
        kept = length if width is None else jnp.minimum(length, width)
        return candidate_len.shape[1] * kept + jnp.sum(candidate_len, axis=1)


_REGISTRY: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str, factory: Callable[..., Verifier]) -> None:
    """Makes `make_verifier(name, model, **options)` return `factory(model, **options)`."""
    if name in _REGISTRY:
        raise ValueError(f"verifier {name!r} is already registered")
    _REGISTRY[name] = factory


def verifier_names() -> list[str]:
    return sorted(_REGISTRY)


def make_verifier(name: str, model, **options) -> Verifier:
    """The verifier registered as `name` around `model` (e.g. "prm" around a `ValueModel`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(verifier_names())}")
    return _REGISTRY[name](model, **options)
