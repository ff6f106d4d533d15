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

from jaxreason.data.trace_store import FLAG_CORRECT, FLAG_ROLLOUT, Trace
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import pad_token_id, prompt_ids
from jaxreason.tasks.base import Problem, Task


def step_ends(tokens: Sequence[int], tokenizer, delimiter: str, max_steps: int) -> np.ndarray:
    """[S] one past the last token of each step of a solution: a step ends on the token whose text contains
    the delimiter (as the search's stop table decides), and the solution's last token ends the last step.
    Past `max_steps` the rest joins the last step."""
    ends = [i + 1 for i, t in enumerate(tokens) if delimiter in tokenizer.decode([int(t)])]
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    if len(ends) > max_steps:
        ends = ends[: max_steps - 1] + ends[-1:]
    return np.asarray(ends, np.int32)


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
) -> tuple[list[Trace], int]:
    """One labelled trace per problem whose sampled solution has at least one step; and the tokens generated."""
    eos_ids = tuple(sorted({*policy.config.eos_token_ids, tokenizer.eos_token_id} - {None}))
    pad = pad_token_id(tokenizer)
    solution_key, rollout_key = jax.random.split(key)
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]
    solutions = sample_continuations(policy, prompts, solution_key, sampling, eos_ids=eos_ids, pad_id=pad,
                                     description="warm-up solutions")
    generated = sum(len(s) for s in solutions)
    # Drop a trailing EOS: it is not part of the text a step is made of.
    solutions = [s[:-1] if len(s) and int(s[-1]) in eos_ids else s for s in solutions]
    ends = [step_ends(s, tokenizer, task.step_delimiter, max_steps) if len(s) else np.zeros(0, np.int32)
            for s in solutions]

    # Every proper step prefix of every solution, M times.
    prefixes, owners = [], []
    for b, (prompt, solution, e) in enumerate(zip(prompts, solutions, ends)):
        for step, end in enumerate(e[:-1]):
            prefixes += [prompt + solution[:end].tolist()] * num_rollouts
            owners += [(b, step)] * num_rollouts
    completions = sample_continuations(policy, prefixes, rollout_key, sampling, eos_ids=eos_ids, pad_id=pad,
                                       description="warm-up rollouts")
    generated += sum(len(c) for c in completions)

    hits = [np.zeros(len(e), np.float32) for e in ends]
    for (b, step), prefix, completion in zip(owners, prefixes, completions):
        text = tokenizer.decode(prefix[len(prompts[b]):] + completion.tolist(), skip_special_tokens=True)
        hits[b][step] += task.is_correct(problems[b], text)
    traces = []
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
