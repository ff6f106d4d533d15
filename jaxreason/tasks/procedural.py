"""Seeded streams of generated problems, split into train and test by question text so the splits never overlap.

A question belongs to "test" when a hash of its text falls in the lowest `test_fraction` of the hash range,
whatever the seed and difficulty settings; a split's stream skips questions of the other split and repeats.
The first n problems of a (split, seed) stream are the same for every n (prefix-stable).
"""

from __future__ import annotations

import abc
import hashlib
import random

from jaxreason.tasks.base import Problem, Task

SPLITS = ("train", "test")
_HASH_RANGE = 2**64
# Consecutive draws without a new problem after which the problem space counts as exhausted.
_MAX_MISSES = 20_000


def _question_hash(question: str) -> int:
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")


def split_of(question: str, test_fraction: float) -> str:
    """The split a question belongs to, the same for every seed."""
    return "test" if _question_hash(question) < test_fraction * _HASH_RANGE else "train"


def content_id(task_name: str, question: str) -> str:
    """A problem id that depends only on the question, so the same problem has the same id in every run."""
    return f"{task_name}-{_question_hash(question):016x}"


class ProceduralTask(Task):
    """A task whose problems are drawn from a random generator (`sample`) rather than read from a file."""

    default_sizes = {"train": 10_000, "test": 1_000}

    def __init__(self, test_fraction: float = 0.1, prompt_template: str | None = None):
        super().__init__(prompt_template)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """One random problem with its gold solution; all randomness comes from `rng`."""

    def split_key(self, question: str) -> str:
        """The text whose hash puts `question` in a split (the question itself)."""
        return question

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` distinct problems of `split` (default `default_sizes[split]`), a function of (split, seed)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; {self.name} has {', '.join(SPLITS)}")
        n = self.default_sizes[split] if n is None else n
        rng = random.Random(f"{self.name}/{split}/{seed}")  # str seeds hash identically in every process
        seen, out, misses = set(), [], 0
        while len(out) < n:
            problem = self.sample(rng)
            if problem.question in seen or split_of(self.split_key(problem.question), self.test_fraction) != split:
                misses += 1
                if misses > _MAX_MISSES:
                    raise ValueError(
                        f"found only {len(out)} distinct {split} problems of {self.name} for n={n}; "
                        "raise the difficulty settings or ask for fewer")
                continue
            misses = 0
            seen.add(problem.question)
            out.append(problem)
        return out
