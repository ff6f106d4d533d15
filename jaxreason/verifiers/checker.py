"""A verifier that asks the task instead of a model: a rule-based process checker, blurred on purpose.

A partial solution is right while none of its steps is wrong by the task's process labels
(`Task.first_wrong_step`), and a finished one when the task's checker accepts it. `noise` blurs that label into a
score: sigmoid(3 (2 label - 1) + noise * z), with z a standard normal fixed per (text, seed), so the same text
always gets the same score. noise 0 is a near-perfect verifier; larger noise lowers its AUC towards 0.5
(Phi(6 / (noise sqrt 2)) for two texts of different labels). It answers "how good must a verifier be before
best-of-N, weighted vote and search turn compute into accuracy?" with the search and selection code unchanged,
and serves as a rule-based reward where process labels exist.

It runs on the host (`jax.pure_callback`), decoding each row: slow, for experiments on small problem sets.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxreason.tasks.base import Problem, Task
from jaxreason.verifiers.base import Verifier, register_verifier


class TaskCheckVerifier(Verifier):
    """Scores by the task's own process labels, blurred by `noise` (module docstring).

    The rows' prompts must be `task.prompt(p)` of `problems` (the problem of a row is found by its prompt text).
    """

    def __init__(self, task: Task, tokenizer, problems: Sequence[Problem], noise: float = 0.0, seed: int = 0,
                 aggregation: str = "last"):
        if not task.has_process_labels:
            raise ValueError(f"task {task.name!r} has no process labels to check steps with")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.task, self.tokenizer, self.noise, self.seed = task, tokenizer, float(noise), seed
        self.problems = _ByPrompt({task.prompt(p): p for p in problems})
        self.aggregation = aggregation

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        del solution_start  # the problem is found by the prompt's text
        out = jax.ShapeDtypeStruct(positions.shape, jnp.float32)
        return jax.pure_callback(self._host_values, out, tokens, mask, positions, vmap_method="sequential")

    def _host_values(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        values = np.zeros(positions.shape, np.float32)
        for b in range(tokens.shape[0]):
            real = np.flatnonzero(mask[b])
            for s, position in enumerate(positions[b]):
                ids = tokens[b, real[real <= position]].tolist()
                values[b, s] = self._score(self.tokenizer.decode(ids, skip_special_tokens=True))
        return values

    def _score(self, text: str) -> float:
        problem, solution = self._split(text)
        if problem is None:
            return 0.0
        steps = self.task.split_steps(solution) if solution else []
        finished = any(self.task.is_final_step(step) for step in steps)
        label = self.task.is_correct(problem, solution) if finished else \
            self.task.first_wrong_step(problem, steps) is None
        z = np.random.default_rng([self.seed, zlib.crc32(text.encode())]).normal()
        return float(1 / (1 + np.exp(-(3.0 * (2 * label - 1) + self.noise * z))))

    def _split(self, text: str) -> tuple[Problem | None, str]:
        """The problem whose prompt begins `text`, and the rest of the text (the solution so far)."""
        for end in range(len(text), 0, -1):
            if text[end - 1] == "\n" and text[:end] in self.problems.table:
                return self.problems.table[text[:end]], text[end:]
        return None, ""


class _ByPrompt:
    """Problems by prompt text; hashed by identity, so the verifier's graph definition stays hashable."""

    def __init__(self, table: dict[str, Problem]):
        self.table = table


register_verifier("task_check", lambda task, tokenizer, problems, **options: TaskCheckVerifier(
    task, tokenizer, problems, **options))
