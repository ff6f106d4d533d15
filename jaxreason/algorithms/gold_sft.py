"""policy_0's data: the gold step-by-step solutions of a slice of problems as (prompt, solution) traces.

ReST-MCTS*, GRPO and the methods after them start from the same policy_0 (SFT of the base model on these
traces with the same settings and seed), so their results compare from one starting point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.sampling.prompts import prompt_ids
from jaxreason.tasks.base import Problem, Task


def gold_traces(task: Task, tokenizer, problems: Sequence[Problem], problem_ids: Sequence[int], *,
                chat: bool = False) -> list[Trace]:
    """One trace per problem: its prompt, then its gold solution (the trained part)."""
    traces = []
    for problem, pid in zip(problems, problem_ids):
        if not problem.solution_steps:
            raise ValueError(f"problem {problem.id} has no gold solution steps for the initial SFT")
        prompt = prompt_ids(tokenizer, task.prompt(problem), chat=chat)
        solution = tokenizer.encode(task.format_solution(problem.solution_steps, problem.answer),
                                    add_special_tokens=False)
        traces.append(Trace(problem_id=pid, iteration=0, tokens=np.asarray(prompt + solution, np.int32),
                            prompt_len=len(prompt), step_ends=np.zeros(0, np.int32),
                            step_values=np.zeros(0, np.float32), reward=1.0, flags=FLAG_CORRECT))
    return traces
