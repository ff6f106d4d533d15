"""Test-time methods: one signature, one registry, and the comparison of several on the same problems.

Every method is a function

    method(problems, *, policy, verifier, tokenizer, task, budget, key, chat=False, mesh=None) -> MethodResult

registered by name with `register_method`. `verifier` is any `jaxreason.verifiers.Verifier` (None for the
methods that use none); `budget` holds every method's settings; `chat` wraps prompts in the tokenizer's chat
template; `mesh` splits the work over devices where the method can. Every method builds its prompts with
`prompt_ids` and stops on `eos_ids`, so methods compared with each other see the same prompts and stop on the
same tokens. A new method (rStar, say) is one function and one `register_method` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxreason.search.config import Budget
from jaxreason.tasks.base import Problem


@dataclasses.dataclass
class MethodResult:
    """One method's output on a batch of problems.

    Attributes:
      method: the method's registered name.
      completions: [B] the chosen solution text per problem (special tokens removed).
      answers: [B] the task's extracted answer of each chosen solution (None: it states none).
      correct: [B] `task.is_correct` of each chosen solution.
      generated_tokens: [B] int64, tokens sampled per problem over all its samples, proposals or nodes (a
        sampled EOS included).
      verifier_tokens: [B] int64, tokens the verifier's forward passes read per problem (0 where a value head
        reads the policy's own hidden states).
      seconds: wall-clock time of the call, compilation included the first time a shape is seen.
    """

    method: str
    completions: list[str]
    answers: list[str | None]
    correct: list[bool]
    generated_tokens: np.ndarray
    verifier_tokens: np.ndarray
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0

    @property
    def total_tokens(self) -> int:
        return int(np.sum(self.generated_tokens))

    @property
    def total_verifier_tokens(self) -> int:
        return int(np.sum(self.verifier_tokens))


Method = Callable[..., MethodResult]


@dataclasses.dataclass(frozen=True)
class _Entry:
    function: Method
    needs_verifier: bool


_METHODS: dict[str, _Entry] = {}


def register_method(name: str, function: Method, *, needs_verifier: bool) -> None:
    """Makes `run(name, ...)` call `function`; `needs_verifier`: it scores with the verifier it is given."""
    if name in _METHODS:
        raise ValueError(f"test-time method {name!r} is already registered")
    _METHODS[name] = _Entry(function, needs_verifier)


def method_names() -> list[str]:
    """Registered test-time methods, in registration order."""
    return list(_METHODS)


def needs_verifier(name: str) -> bool:
    return _entry(name).needs_verifier


def _entry(name: str) -> _Entry:
    if name not in _METHODS:
        raise ValueError(f"unknown test-time method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def run(method: str, problems: Sequence[Problem], *, policy, verifier=None, tokenizer, task, budget: Budget = Budget(),
        key: jax.Array, chat: bool = False, mesh=None) -> MethodResult:
    """Solves `problems` with the registered `method`; a method that needs a verifier refuses to run without."""
    entry = _entry(method)
    if not problems:
        raise ValueError("no problems given")
    if entry.needs_verifier and verifier is None:
        raise ValueError(f"method {method!r} needs a verifier (a trained PRM or ORM)")
    return entry.function(problems, policy=policy, verifier=verifier if entry.needs_verifier else None,
                          tokenizer=tokenizer, task=task, budget=budget, key=key, chat=chat, mesh=mesh)


def compare(methods: Sequence[str], problems: Sequence[Problem], *, key: jax.Array, **kwargs) -> list[dict]:
    """Rows of {method, accuracy, generated_tokens, verifier_tokens, seconds, problems} for each method on the
    same problems (method i draws with `fold_in(key, i)`); `kwargs` as `run`'s."""
    rows = []
    for i, method in enumerate(methods):
        result = run(method, problems, key=jax.random.fold_in(key, i), **kwargs)
        rows.append({"method": method, "accuracy": result.accuracy, "generated_tokens": result.total_tokens,
                     "verifier_tokens": result.total_verifier_tokens, "seconds": round(result.seconds, 3),
                     "problems": len(problems)})
    return rows
