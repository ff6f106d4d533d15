"""Problem sets read from user-provided JSONL files in the GSM8K and MATH formats.

GSM8K: {"question": ..., "answer": "<rationale lines>\\n#### <final answer>"}. The gold steps are the rationale's
lines without GSM8K's calculator annotations ("<<48/2=24>>"); the gold answer drops thousands separators.
MATH: {"problem": ..., "solution": "... \\boxed{<final answer>} ...", "level"?, "type"?}. The gold answer is the
last \\boxed{} of the solution, the gold steps its non-empty lines; level and type go to `meta`.
A problem's id is "<file name>:<line number>". Any malformed line is a ValueError naming the file and line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from jaxreason.data.jsonl import iter_records
from jaxreason.tasks.base import Problem, Task, register_task
from jaxreason.tasks.math_answers import last_boxed, normalize_answer

_CALCULATOR = re.compile(r"<<[^>]*>>")


def load_gsm8k(path: str | Path) -> list[Problem]:
    """The problems of a GSM8K-format JSONL file."""
    path = Path(path)
    problems = []
    for number, record in iter_records(path, ("question", "answer")):
        rationale, hashes, final = record["answer"].rpartition("####")
        final = normalize_answer(final)
        if not hashes or not final:
            raise ValueError(f"{path}:{number}: the answer does not end with '#### <final answer>'")
        steps = tuple(s for s in (_CALCULATOR.sub("", line).strip() for line in rationale.split("\n")) if s)
        problems.append(Problem(id=f"{path.name}:{number}", question=record["question"].strip(), answer=final,
                                solution_steps=steps))
    return problems


def load_math(path: str | Path) -> list[Problem]:
    """The problems of a MATH-format JSONL file."""
    path = Path(path)
    problems = []
    for number, record in iter_records(path, ("problem", "solution")):
        answer = last_boxed(record["solution"])
        if not answer:
            raise ValueError(f"{path}:{number}: the solution has no \\boxed{{...}} answer")
        steps = tuple(line.strip() for line in record["solution"].split("\n") if line.strip())
        meta = {key: record[key] for key in ("level", "type") if key in record}
        problems.append(Problem(id=f"{path.name}:{number}", question=record["problem"].strip(), answer=answer,
                                solution_steps=steps, meta=meta))
    return problems


class FileTask(Task):
    """A task read from files: `path` serves every split unless `splits` names a file for it.

    With only `path`, "train" and "test" are the same problems: give `splits` to keep them apart.
    """

    load: Callable[[Path], list[Problem]]
    prompt_template = 'Question: {question}\nSolve it step by step, one step per line, ending with "The answer is X".\n'

    def __init__(self, path: str | Path | None = None, splits: Mapping[str, str | Path] | None = None,
                 prompt_template: str | None = None):
        super().__init__(prompt_template)
        if path is None and not splits:
            raise ValueError(f"task {self.name} needs path= or splits= (JSONL files)")
        self.path = None if path is None else Path(path)
        self.splits = {split: Path(p) for split, p in (splits or {}).items()}
        self._loaded: dict[Path, list[Problem]] = {}

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """All problems of the split's file in file order, or, given `n`, a random sample of n of them."""
        path = self.splits.get(split, self.path)
        if path is None:
            raise ValueError(f"task {self.name} has no file for split {split!r}; it has {', '.join(self.splits)}")
        if path not in self._loaded:
            self._loaded[path] = self.load(path)
        problems = self._loaded[path]
        if n is None:
            return list(problems)
        if n > len(problems):
            raise ValueError(f"asked for {n} problems but {path} holds {len(problems)}")
        return random.Random(seed).sample(problems, n)


class GSM8KTask(FileTask):
    name = "gsm8k"
    load = staticmethod(load_gsm8k)


class MathTask(FileTask):
    name = "math"
    load = staticmethod(load_math)


register_task("gsm8k", GSM8KTask)
register_task("math", MathTask)
