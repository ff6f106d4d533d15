"""Rewards of sampled attempts: from a task's checker, from any verifier, or from a user's function.

A reward function maps (problems, prompts, completions) to one float per completion:
`fn(problems: list[Problem], prompts: list[list[int]], completions: list[list[int]]) -> [R] floats`, where row
r is completion r of problem r. `checked_rewards` calls one and turns a bad result (wrong shape or type, NaN)
into an error that names the function and the problem, before it can reach a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from jaxreason.tasks.base import Problem, Task
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.positions import StepSplitter

RewardFn = Callable[[Sequence[Problem], Sequence[Sequence[int]], Sequence[Sequence[int]]], np.ndarray]
TRUNCATION_RULES = ("zero", "mask", "keep")


def task_reward(task: Task, tokenizer) -> RewardFn:
    """1.0 where the task's checker accepts the completion's answer, else 0.0 (a rule-based outcome reward)."""

    def reward(problems, prompts, completions):
        del prompts
        texts = [tokenizer.decode(list(c), skip_special_tokens=True) for c in completions]
        return np.asarray(task.check_many(problems, texts), np.float32)

    reward.__name__ = f"task_reward({task.name})"
    return reward


def verifier_reward(verifier: Verifier, tokenizer, task: Task, *, pad_id: int, mesh: Mesh | None = None) -> RewardFn:
    """The verifier's score in [0, 1] of each prompt + completion (its steps cut by the task's delimiter); with
    `mesh`, the rows are split over it (`score_solutions`)."""
    splitter = StepSplitter(tokenizer, task.step_delimiter)

    def reward(problems, prompts, completions):
        del problems
        return score_solutions(verifier, prompts, completions, splitter, pad_id=pad_id,
                               mesh=mesh).scores.astype(np.float32)

    reward.__name__ = f"verifier_reward({type(verifier).__name__})"
    return reward


def checked_rewards(fn: RewardFn, problems: Sequence[Problem], prompts: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]]) -> np.ndarray:
    """`fn`'s rewards as a float32 [R] array; a result of another shape, a non-number or a NaN/inf is a
    ValueError naming `fn` and the first bad problem."""
    name = getattr(fn, "__name__", repr(fn))
    raw = fn(problems, prompts, completions)
    try:
        rewards = np.asarray(raw, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward function {name} returned {type(raw).__name__}, not numbers: {e}") from None
    if rewards.shape != (len(completions),):
        raise ValueError(f"reward function {name} returned shape {rewards.shape} for {len(completions)} "
                         f"completions; expected ({len(completions)},)")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise ValueError(f"reward function {name} returned {rewards[bad[0]]} for problem {problems[bad[0]].id!r} "
                         f"(row {bad[0]}); rewards must be finite")
    return rewards.astype(np.float32)


def apply_truncation(rewards: np.ndarray, truncated: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and a [R] keep-mask after the rule for attempts cut at the token limit: "zero" (reward 0,
    trained: the policy learns to finish), "mask" (left out of the loss), "keep" (scored as they are)."""
    if rule not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule {rule!r}; expected one of {TRUNCATION_RULES}")
    truncated = np.asarray(truncated, bool)
    if rule == "zero":
        return np.where(truncated, 0.0, rewards).astype(np.float32), np.ones_like(truncated)
    if rule == "mask":
        return rewards, ~truncated
    return rewards, np.ones_like(truncated)
