"""Rollout-labelled PRM warm-up data (Math-Shepherd style), so MCTS* has a meaningful guide from the start.

For each problem the policy samples one solution; for each of its step prefixes it samples M completions,
and the prefix's value target is the fraction of them that reach the gold answer. The whole solution's
own last step is labelled by its correctness. All rollouts of all prefixes go through one fixed-shape
sampling program (`sample_continuations`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxreason.data.trace_store import FLAG_CORRECT, FLAG_ROLLOUT, Trace
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.tasks.base import Problem, Task
from jaxreason.verifiers.positions import StepSplitter


def rollout_value_traces(
    policy: CausalLM,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    problem_ids: Sequence[int],
    *,
    num_rollouts: int,
    sampling: SamplingConfig,
    key: jax.Array,
    iteration: int = 0,
    max_steps: int = 8,
    chat: bool = False,
    rollout_traces: bool = False,
    mesh: Mesh | None = None,
) -> tuple[list[Trace], int]:
    """One labelled trace per problem whose sampled solution has at least one step; and the tokens generated.

    A solution stays as generated, its EOS included, and its steps are cut by the one rule
    (`jaxreason.verifiers.positions`), so every target sits where the PRM is later read. With `rollout_traces`,
    every rollout is a labelled trace too: a whole solution (the prefix, then the rollout) whose last step's
    target is its correctness and whose other steps have none (NaN), M more labelled solutions per prefix at
    no extra sampling. With `mesh`, the sampling is split over its batch devices (`sample_continuations`).
    """
    stop_ids = eos_ids(tokenizer, policy.config)
    pad = pad_token_id(tokenizer)
    split = StepSplitter(tokenizer, task.step_delimiter)
    solution_key, rollout_key = jax.random.split(key)
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]
    solutions = sample_continuations(policy, prompts, solution_key, sampling, eos_ids=stop_ids, pad_id=pad,
                                     description="warm-up solutions", mesh=mesh)
    generated = sum(len(s) for s in solutions)
    ends = [split(s, max_steps) for s in solutions]

    # Every proper step prefix of every solution, M times.
    prefixes, owners = [], []
    for b, (prompt, solution, e) in enumerate(zip(prompts, solutions, ends)):
        for step, end in enumerate(e[:-1]):
            prefixes += [prompt + solution[:end].tolist()] * num_rollouts
            owners += [(b, step)] * num_rollouts
    completions = sample_continuations(policy, prefixes, rollout_key, sampling, eos_ids=stop_ids, pad_id=pad,
                                       description="warm-up rollouts", mesh=mesh)
    generated += sum(len(c) for c in completions)

    hits = [np.zeros(len(e), np.float32) for e in ends]
    traces = []
    for (b, step), prefix, completion in zip(owners, prefixes, completions):
        text = tokenizer.decode(prefix[len(prompts[b]):] + completion.tolist(), skip_special_tokens=True)
        correct = task.is_correct(problems[b], text)
        hits[b][step] += correct
        if rollout_traces and len(completion):
            solution = np.concatenate([np.asarray(prefix[len(prompts[b]):], np.int32), completion])
            e = split(solution, max_steps) + len(prompts[b])
            values = np.full(len(e), np.nan, np.float32)
            values[-1] = float(correct)
            traces.append(Trace(
                problem_id=int(problem_ids[b]), iteration=iteration,
                tokens=np.asarray(prefix + completion.tolist(), np.int32), prompt_len=len(prompts[b]),
                step_ends=e, step_values=values, reward=float(correct),
                flags=FLAG_ROLLOUT | (FLAG_CORRECT if correct else 0)))
    for b, (problem, prompt, solution, e) in enumerate(zip(problems, prompts, solutions, ends)):
        if not len(e):
            continue
        correct = task.is_correct(problem, tokenizer.decode(solution.tolist(), skip_special_tokens=True))
        values = hits[b] / num_rollouts
        values[-1] = float(correct)
        traces.append(Trace(
            problem_id=int(problem_ids[b]), iteration=iteration,
            tokens=np.concatenate([np.asarray(prompt, np.int32), solution]).astype(np.int32),
            prompt_len=len(prompt), step_ends=e + len(prompt), step_values=values, reward=float(correct),
            flags=FLAG_ROLLOUT | (FLAG_CORRECT if correct else 0),
        ))
    return traces, generated
