"""ReST-EM's E-step (Singh et al., 2023): sample solutions per problem, keep the correct ones for SFT.

Sampling runs in rounds of `samples_per_round` solutions per problem until a budget of generated tokens is
spent, so ReST-EM can be given what a ReST-MCTS* search spent on the same problems. A round after the first
draws only the solutions the remaining budget buys at the mean length so far, so the total ends just past the
budget instead of up to a whole round beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxreason.data.trace_store import FLAG_BASELINE, FLAG_CORRECT, Trace
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.tasks.base import Problem, Task

_ROW_MULTIPLE = 64


def sample_solutions(
    policy: CausalLM,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    problem_ids: Sequence[int],
    *,
    token_budget: int,
    samples_per_round: int,
    sampling: SamplingConfig,
    key: jax.Array,
    iteration: int,
    chat: bool = False,
    mesh: Mesh | None = None,
) -> tuple[list[Trace], int]:
    """Sampled solutions (one full round, then rounds until `token_budget` generated tokens are spent) as
    traces flagged FLAG_BASELINE (and FLAG_CORRECT when right); and the tokens generated.

    A later round is cut to the samples the remaining budget needs at the mean length so far, rounded up to
    `_ROW_MULTIPLE` (few compiled shapes), spread one per problem over a shuffled problem order. With `mesh`, each
    round is split over its batch devices (`sample_continuations`).
    """
    stop_ids = eos_ids(tokenizer, policy.config)
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]
    traces: list[Trace] = []
    generated, round_ = 0, 0
    while round_ == 0 or generated < token_budget:
        rows = [b for _ in range(samples_per_round) for b in range(len(problems))]  # sample-major
        if round_:  # cut: one more sample for the first problems of a shuffled order
            order = np.random.default_rng([iteration, round_]).permutation(len(problems))
            need = math.ceil((token_budget - generated) / max(generated / len(traces), 1.0))
            rows = [int(order[b]) for b in rows][:-(-need // _ROW_MULTIPLE) * _ROW_MULTIPLE]
        outs = sample_continuations(policy, [prompts[b] for b in rows], jax.random.fold_in(key, round_), sampling,
                                    eos_ids=stop_ids, pad_id=pad_token_id(tokenizer),
                                    description=f"rest-em round {round_ + 1}", mesh=mesh)
        for b, new in zip(rows, outs):
            generated += len(new)
            correct = task.is_correct(problems[b], tokenizer.decode(new.tolist(), skip_special_tokens=True))
            traces.append(Trace(
                problem_id=int(problem_ids[b]), iteration=iteration,
                tokens=np.concatenate([np.asarray(prompts[b], np.int32), new]).astype(np.int32),
                prompt_len=len(prompts[b]), step_ends=np.zeros(0, np.int32), step_values=np.zeros(0, np.float32),
                reward=float(correct), flags=FLAG_BASELINE | (FLAG_CORRECT if correct else 0),
            ))
        round_ += 1
        if not any(len(new) for new in outs):  # nothing drawn: more rounds cannot spend the budget
            break
    return traces, generated
