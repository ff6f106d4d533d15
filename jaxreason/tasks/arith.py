"""Multi-step arithmetic: generated expressions with one-operation-per-line gold solutions.

Grammar (ASCII only, short enough for a character-level model):

    question := "What is " NUM (" " OP " " NUM){k} "?"          k in [min_ops, max_ops], OP from `ops`
    solution := (NUM " " OP " " NUM " = " NUM "\\n"){k} "The answer is " NUM

With `check_steps` a completion is correct only when, besides the final answer, every line before the
answer line is a true equation "a OP b = c" (the final answer alone lets a solution with wrong steps
through, which self-training would then learn from).

Usual precedence: the gold solution first does every * and / from left to right, then every + and - from
left to right, one operation per line. Numbers joined by * or / lie in [2, max_factor] (a product of two
small numbers is one learnable fact), the others in [1, max_operand]. Every division is exact and no
intermediate result is negative, so every number in a solution is a non-negative integer.

Example (prompt, then solution):

    Q: What is 12 + 7 * 3 - 5?
    7 * 3 = 21
    12 + 21 = 33
    33 - 5 = 28
    The answer is 28
"""

from __future__ import annotations

import random
import re

from jaxreason.tasks.base import Problem, register_task
from jaxreason.tasks.math_answers import answers_equal
from jaxreason.tasks.procedural import ProceduralTask, content_id

_MULDIV = ("*", "/")
_EQUATION = re.compile(r"\s*(\d+) ([-+*/]) (\d+) = (\d+)\s*")
_LAST_NUMBER = re.compile(r"-?\d+")


def equation_holds(line: str) -> bool:
    """Whether `line` is one true step "a OP b = c" (exact integer division only)."""
    match = _EQUATION.fullmatch(line)
    if match is None:
        return False
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    if op == "/":
        return b != 0 and a % b == 0 and a // b == c
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


def evaluate(items: list) -> int | None:
    """The value of [n, op, n, op, ...] with the usual precedence (* and / first, each level left to right), or
    None when a division is inexact or by zero."""
    items = list(items)
    for level in (_MULDIV, ("+", "-")):
        i = 1
        while i < len(items):
            if items[i] in level:
                a, op, b = items[i - 1], items[i], items[i + 1]
                if op == "/" and (b == 0 or a % b):
                    return None
                items[i - 1:i + 2] = [{"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]]
            else:
                i += 2
    return items[0]


def expression_items(question: str) -> list:
    """[n, op, n, ...] of a question "What is <expression>?"."""
    expression = question.removeprefix("What is ").removesuffix("?").split()
    return [int(x) if i % 2 == 0 else x for i, x in enumerate(expression)]


class ArithTask(ProceduralTask):
    """Arithmetic expressions of `min_ops`..`max_ops` operations drawn from `ops` (a subset of "+-*/")."""

    name = "arith"

    def __init__(self, min_ops: int = 1, max_ops: int = 3, max_operand: int = 20, max_factor: int = 10,
                 ops: str = "+-*", test_fraction: float = 0.1, prompt_template: str | None = None,
                 check_steps: bool = False, last_number: bool = False):
        super().__init__(test_fraction, prompt_template)
        self.check_steps, self.last_number = check_steps, last_number
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
        if max_operand < 1 or max_factor < 2:
            raise ValueError("need max_operand >= 1 and max_factor >= 2")
        if not ops or len(set(ops)) != len(ops) or set(ops) - set("+-*/"):
            raise ValueError(f"ops must be distinct characters from '+-*/', got {ops!r}")
        self.min_ops, self.max_ops = min_ops, max_ops
        self.max_operand, self.max_factor, self.ops = max_operand, max_factor, ops

    def extract_answer(self, completion: str) -> str | None:
        """The stated final answer; with `last_number`, a completion that states none answers with its last
        number (how GSM8K-style evaluations read a small model that computes but skips the answer line)."""
        answer = super().extract_answer(completion)
        if answer is None and self.last_number:
            numbers = _LAST_NUMBER.findall(completion)
            answer = numbers[-1] if numbers else None
        return answer

    def is_correct(self, problem: Problem, completion: str) -> bool:
        if not super().is_correct(problem, completion):
            return False
        if not self.check_steps:
            return True
        lines = [line for line in completion.split(self.step_delimiter) if line.strip()]
        steps = [line for line in lines if not self.is_final_step(line)]
        return all(equation_holds(line) for line in steps)

    def first_wrong_step(self, problem: Problem, steps) -> int | None:
        """The first step that is not a true equation reducing one adjacent operation of what is left of the
        expression without changing its value (so "12 + 7 = 19" first, in 12 + 7 * 3, is wrong), or a final
        answer line that is not the fully reduced value; None when every step is right."""
        items = expression_items(problem.question)
        value = evaluate(items)
        for i, step in enumerate(steps):
            if self.is_final_step(step):
                done = len(items) == 1 and answers_equal(self.extract_answer(step), str(items[0]))
                return None if done else i
            match = _EQUATION.fullmatch(step)
            if match is None or not equation_holds(step):
                return i
            a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            for j in range(1, len(items), 2):
                if (items[j - 1], items[j], items[j + 1]) == (a, op, b):
                    reduced = items[:j - 1] + [c] + items[j + 2:]
                    if evaluate(reduced) == value:
                        items = reduced
                        break
            else:
                return i
        return None

    def sample(self, rng: random.Random) -> Problem:
        while True:
            problem = self._try_sample(rng)
            if problem is not None:
                return problem

    def _try_sample(self, rng: random.Random) -> Problem | None:
        """A random problem, or None when the draw would need an inexact division or a negative number."""
        ops = [rng.choice(self.ops) for _ in range(rng.randint(self.min_ops, self.max_ops))]
        numbers, steps = [], []
        terms, term_ops = [], []  # values of the maximal * / chains and the + - between them
        value = 0
        for i in range(len(ops) + 1):
            left = ops[i - 1] if i > 0 else None
            right = ops[i] if i < len(ops) else None
            if left == "/":
                divisors = [d for d in range(2, self.max_factor + 1) if value % d == 0]
                if not divisors:
                    return None
                x = rng.choice(divisors)
            elif left in _MULDIV or right in _MULDIV:
                x = rng.randint(2, self.max_factor)
            else:
                x = rng.randint(1, self.max_operand)
            numbers.append(x)
            if left in _MULDIV:
                result = value * x if left == "*" else value // x
                steps.append(f"{value} {left} {x} = {result}")
                value = result
            else:
                if left is not None:
                    terms.append(value)
                    term_ops.append(left)
                value = x
        terms.append(value)
        total = terms[0]
        for op, term in zip(term_ops, terms[1:]):
            result = total + term if op == "+" else total - term
            if result < 0:
                return None
            steps.append(f"{total} {op} {term} = {result}")
            total = result
        expression = str(numbers[0]) + "".join(f" {op} {x}" for op, x in zip(ops, numbers[1:]))
        question = f"What is {expression}?"
        return Problem(id=content_id(self.name, question), question=question, answer=str(total),
                       solution_steps=tuple(steps), meta={"num_ops": len(ops)})


register_task("arith", ArithTask)
