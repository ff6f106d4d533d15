"""Scoring many solutions on the host's behalf: rows cut into steps by the one rule, padded into a few fixed
shapes, and scored by one jitted call per chunk."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.sampling.placement import inference_state
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.positions import StepSplitter


@dataclasses.dataclass(frozen=True)
class ScoredSolutions:
    """Scores of N solutions.

    Attributes:
      scores: [N] each solution's score (the verifier's aggregation of its step scores).
      step_scores: N arrays [S_i], the score of each step.
      prompt_scores: [N] the value of the prompt alone (before the first step).
      verifier_tokens: [N] tokens each row's verifier pass read (prompt and solution).
    """

    scores: np.ndarray
    step_scores: list[np.ndarray]
    prompt_scores: np.ndarray
    verifier_tokens: np.ndarray


@functools.partial(jax.jit, static_argnames=("verifier_def",))
def _step_scores_jit(verifier_def, verifier_state, tokens, mask, step_ends, prompt_len):
    return nnx.merge(verifier_def, verifier_state).scored(tokens, mask, step_ends, prompt_len)


def score_solutions(
    verifier: Verifier,
    prompts: Sequence[Sequence[int]],
    solutions: Sequence[Sequence[int]],
    splitter: StepSplitter,
    *,
    pad_id: int,
    max_steps: int | None = None,
    chunk_rows: int = 256,
    width_multiple: int = 64,
    mesh: Mesh | None = None,
) -> ScoredSolutions:
    """Scores solution i (token ids as generated, EOS included) after prompt i.

    Rows are right-padded to the longest, rounded up to `width_multiple`; chunks of `chunk_rows` rows (the last
    filled with copies) keep the compiled shapes few. With `mesh`, the verifier's weights are placed by the rules
    in its compute dtype (`inference_state`) and each chunk, rounded up to a multiple of the mesh's batch devices,
    is split over them.
    """
    if len(prompts) != len(solutions):
        raise ValueError(f"{len(prompts)} prompts for {len(solutions)} solutions")
    if not solutions:
        return ScoredSolutions(np.zeros(0, np.float32), [], np.zeros(0, np.float32), np.zeros(0, np.int64))
    rows = [list(p) + [int(t) for t in s] for p, s in zip(prompts, solutions)]
    ends = [splitter(s, max_steps) + len(p) for p, s in zip(prompts, solutions)]
    ends = [e if len(e) else np.asarray([len(p)], np.int32) for e, p in zip(ends, prompts)]  # no step: the prompt
    width = -(-max(len(r) for r in rows) // width_multiple) * width_multiple
    most_steps = max(len(e) for e in ends)
    size = sharding.split_rows(min(chunk_rows, len(rows)), mesh)
    graphdef, state = nnx.split(verifier) if mesh is None else inference_state(verifier, mesh)
    steps_out, scores_out, prompt_out = [], [], []
    for start in range(0, len(rows), size):
        chunk = list(range(start, min(start + size, len(rows))))
        chunk += [chunk[-1]] * (size - len(chunk))
        tokens = np.full((size, width), pad_id, np.int32)
        mask = np.zeros((size, width), np.int32)
        step_ends = np.zeros((size, most_steps), np.int32)
        prompt_len = np.zeros(size, np.int32)
        for i, r in enumerate(chunk):
            tokens[i, :len(rows[r])] = rows[r]
            mask[i, :len(rows[r])] = 1
            step_ends[i, :len(ends[r])] = ends[r]
            prompt_len[i] = len(prompts[r])
        batch = tuple(jnp.asarray(x) for x in (tokens, mask, step_ends, prompt_len))
        if mesh is not None:
            batch = sharding.put_rows(batch, mesh)
        # addressable: rows (or a verifier's weights) split over the processes of a multi-host job are gathered
        step, score, prompt = addressable(_step_scores_jit(graphdef, state, *batch))
        real = min(size, len(rows) - start)
        steps_out.append(np.asarray(step)[:real])
        scores_out.append(np.asarray(score)[:real])
        prompt_out.append(np.asarray(prompt)[:real])
    step_scores = np.concatenate(steps_out)
    return ScoredSolutions(
        scores=np.concatenate(scores_out),
        step_scores=[step_scores[i, :len(e)] for i, e in enumerate(ends)],
        prompt_scores=np.concatenate(prompt_out),
        verifier_tokens=np.asarray([len(r) for r in rows], np.int64),
    )
