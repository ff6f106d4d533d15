"""Countdown: combine the given numbers with + - * / to reach a target, one operation per line.

Grammar (ASCII only):

    question := "Use " NUM (" " NUM){n-1} " to make " TARGET       n in [min_numbers, max_numbers]
    solution := (NUM " " OP " " NUM " = " NUM "\\n")* "The answer is " TARGET

Example (prompt, then solution):

    Q: Use 25 5 3 7 to make 67
    25 - 5 = 20
    20 * 3 = 60
    60 + 7 = 67
    The answer is 67

A completion is correct only if (`validate_countdown`): every non-empty line but the last is a step
"a op b = c" whose operands are taken from the pool of available numbers (the given numbers and earlier
results, each used at most once), whose arithmetic is right and whose result is a positive integer (so
a - b needs a > b and a / b must be exact); the result joins the pool. The last line is
"The answer is N" with N the target and still in the pool. Reaching the target by reusing a number, or
with a number that was never available, is wrong.

Every generated problem is solvable: the target is built by combining all the numbers in a random order.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from jaxreason.tasks.base import Problem, register_task
from jaxreason.tasks.procedural import ProceduralTask, content_id

_STEP = re.compile(r"(\d+) *([-+*/]) *(\d+) *= *(\d+)")
_FINAL = re.compile(r"The answer is (\d+)\.?")


def apply_op(a: int, op: str, b: int) -> int | None:
    """a op b under Countdown's rules; None when the result would not be a positive integer."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b > 0 and a % b == 0 else None
    raise ValueError(f"unknown operation {op!r}")


def validate_countdown(numbers: Sequence[int], target: int, completion: str, ops: str = "+-*/") -> str | None:
    """Why `completion` is not a valid solution, or None when it is."""
    lines = [line.strip() for line in completion.split("\n") if line.strip()]
    if not lines:
        return "empty completion"
    pool = Counter(numbers)
    *steps, final = lines
    for i, line in enumerate(steps, start=1):
        match = _STEP.fullmatch(line)
        if match is None:
            return f"step {i} is not 'a op b = c': {line!r}"
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if op not in ops:
            return f"step {i}: {op} is not an allowed operation"
        for operand in (a, b):
            if pool[operand] == 0:
                return f"step {i}: {operand} is not available"
            pool[operand] -= 1
        result = apply_op(a, op, b)
        if result is None:
            return f"step {i}: {a} {op} {b} is not a positive integer"
        if result != c:
            return f"step {i}: {a} {op} {b} is {result}, not {c}"
        pool[c] += 1
    match = _FINAL.fullmatch(final)
    if match is None:
        return f"the last line is not 'The answer is N': {final!r}"
    answer = int(match[1])
    if answer != target:
        return f"the answer {answer} is not the target {target}"
    if pool[answer] == 0:
        return f"the answer {answer} was never reached"
    return None


class CountdownTask(ProceduralTask):
    """Countdown with `min_numbers`..`max_numbers` numbers in [1, max_number] and targets in [1, max_target]."""

    name = "countdown"

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 25, max_target: int = 100,
                 ops: str = "+-*/", test_fraction: float = 0.1, prompt_template: str | None = None):
        super().__init__(test_fraction, prompt_template)
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
        if max_number < 2 or max_target < 1:
            raise ValueError("need max_number >= 2 and max_target >= 1")
        if "+" not in ops or len(set(ops)) != len(ops) or set(ops) - set("+-*/"):
            raise ValueError(f"ops must be distinct characters from '+-*/' including '+', got {ops!r}")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target, self.ops = max_number, max_target, ops

    def sample(self, rng: random.Random) -> Problem:
        while True:
            problem = self._try_sample(rng)
            if problem is not None:
                return problem

    def _try_sample(self, rng: random.Random) -> Problem | None:
        """A random problem, or None when its target is out of range or is one of the numbers."""
        numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
        pool, steps = list(numbers), []
        while len(pool) > 1:
            a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            big, small = max(a, b), min(a, b)
            # (op, left, right): - and / take the larger number first; * and / by 1 would be no-op steps.
            moves = [(op, x, y) for op, x, y in (("+", a, b), ("-", big, small), ("*", a, b), ("/", big, small))
                     if op in self.ops and apply_op(x, op, y) is not None and not (op in "*/" and 1 in (x, y))]
            op, x, y = rng.choice(moves)
            result = apply_op(x, op, y)
            steps.append(f"{x} {op} {y} = {result}")
            pool.append(result)
        target = pool[0]
        if target > self.max_target or target in numbers:
            return None
        question = f"Use {' '.join(map(str, numbers))} to make {target}"
        return Problem(id=content_id(self.name, question), question=question, answer=str(target),
                       solution_steps=tuple(steps), meta={"numbers": tuple(numbers), "target": target})

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return validate_countdown(problem.meta["numbers"], problem.meta["target"], completion, self.ops) is None


register_task("countdown", CountdownTask)
