"""Problems, the Task interface every search and training method evaluates through, and the task registry.

A solution is a sequence of steps joined by `STEP_DELIMITER` ("\n", so one step is one line) and closed by a
final line "The answer is X". Step-level search expands one line at a time; a line that starts with
`ANSWER_PREFIX` ends the solution.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from jaxreason.tasks.math_answers import ANSWER_PREFIX, answers_equal, extract_answer

STEP_DELIMITER = "\n"


@dataclass(frozen=True)
class Problem:
    """One problem: its text, canonical gold answer and gold step-by-step solution (empty when unknown)."""

    id: str
    question: str
    answer: str
    solution_steps: tuple[str, ...] = ()
    # Left out of the hash so that a Problem stays hashable although a dict is not.
    meta: dict = field(default_factory=dict, hash=False)


class Task(abc.ABC):
    """A problem set with its prompt format and answer checker."""

    name: str
    step_delimiter: str = STEP_DELIMITER
    answer_prefix: str = ANSWER_PREFIX
    prompt_template: str = "Q: {question}\n"

    def __init__(self, prompt_template: str | None = None):
        if prompt_template is not None:
            if "{question}" not in prompt_template:
                raise ValueError("prompt_template must contain '{question}'")
            self.prompt_template = prompt_template

    @abc.abstractmethod
    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems of `split` (all, or the task's default size, when None), chosen by `seed`."""

    def prompt(self, problem: Problem) -> str:
        """The text the policy continues; it ends with the step delimiter so the first step starts a line."""
        return self.prompt_template.format(question=problem.question)

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return answers_equal(self.extract_answer(completion), problem.answer)

    def check_many(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[bool]:
        """`is_correct` of each (problem, completion) pair; a task whose checks are slow (run code) runs them
        side by side."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        return [self.is_correct(p, c) for p, c in zip(problems, completions)]

    def format_solution(self, steps: Sequence[str], answer: str) -> str:
        """The steps, one per line, then the final-answer line: the completion a perfect policy writes."""
        return self.step_delimiter.join([*steps, f"{self.answer_prefix}{answer}"])

    def is_final_step(self, step: str) -> bool:
        """Whether `step` is the final-answer line, which makes its search node terminal."""
        return step.strip().startswith(self.answer_prefix.strip())

    def split_steps(self, completion: str) -> list[str]:
        """The completion's steps as the verifiers cut it: one per delimiter, and what follows the last."""
        steps = completion.split(self.step_delimiter)
        return steps[:-1] if len(steps) > 1 and steps[-1] == "" else steps

    def first_wrong_step(self, problem: Problem, steps: Sequence[str]) -> int | None:
        """Process label: the index of the first wrong step (None when every step is right), for tasks that can
        check steps; others raise NotImplementedError (`has_process_labels` says which)."""
        raise NotImplementedError(f"task {self.name!r} has no process labels")

    @property
    def has_process_labels(self) -> bool:
        return type(self).first_wrong_step is not Task.first_wrong_step


@dataclass(frozen=True)
class TaskSpec:
    """Which problem set, as every config names it: a registered task, its settings and, for tasks read from a
    file (gsm8k, math), the file."""

    name: str = "arith"
    path: str | None = None
    options: dict = field(default_factory=dict, hash=False)  # e.g. arith's {max_ops: 2}

    def build(self) -> Task:
        return get_task(self.name, **({"path": self.path} if self.path else {}), **self.options)


_FACTORIES: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Makes `get_task(name, **kwargs)` return `factory(**kwargs)`; a name can be registered once."""
    if name in _FACTORIES:
        raise ValueError(f"task {name!r} is already registered")
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with `kwargs` (e.g. difficulty settings or `path=`)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return _FACTORIES[name](**kwargs)
