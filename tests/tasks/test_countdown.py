"""Countdown: solvable generated problems, valid gold solutions, and a strict step checker."""

import pytest

from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.tasks import CountdownTask, Problem, validate_countdown

UNK_ID = 3


def test_gold_solutions_validate():
    task = CountdownTask()
    problems = task.problems("train", 1000)
    for p in problems:
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert p.question == f"Use {' '.join(map(str, numbers))} to make {target}" and p.answer == str(target)
        assert 3 <= len(numbers) <= 4 and all(1 <= x <= 25 for x in numbers)
        assert 1 <= target <= 100 and target not in numbers
        solution = task.format_solution(p.solution_steps, p.answer)
        assert validate_countdown(numbers, target, solution) is None, solution
        assert task.is_correct(p, solution)


def test_deterministic_disjoint_and_char_tokenizable():
    task = CountdownTask()
    train, test = task.problems("train", 1000, seed=1), task.problems("test", 200, seed=2)
    assert train == CountdownTask().problems("train", 1000, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    tokenizer = build_char_tokenizer()
    for p in train + test:
        text = task.prompt(p) + task.format_solution(p.solution_steps, p.answer)
        assert len(text) < 100 and UNK_ID not in tokenizer.encode(text)


def test_operation_subset_is_respected_by_generator_and_checker():
    task = CountdownTask(ops="+-", min_numbers=3, max_numbers=3)
    for p in task.problems("train", 200):
        assert len(p.meta["numbers"]) == 3
        assert all(" * " not in s and " / " not in s for s in p.solution_steps)
    problem = Problem("p", "Use 4 5 7 to make 20", "20", meta={"numbers": (4, 5, 7), "target": 20})
    assert not task.is_correct(problem, "4 * 5 = 20\nThe answer is 20")
    assert CountdownTask().is_correct(problem, "4 * 5 = 20\nThe answer is 20")


@pytest.mark.parametrize("numbers,target,completion", [
    ((25, 5, 3), 60, "25 - 5 = 20\n20 * 3 = 60\nThe answer is 60"),
    ((25, 5, 3), 60, "  25 - 5 = 20  \n\n20*3=60\nThe answer is 60.\n"),  # spacing, blank lines, final period
    ((25, 5, 3, 2), 60, "25 + 5 = 30\n30 * 2 = 60\nThe answer is 60"),  # not every number has to be used
    ((4, 4, 6, 2), 2, "4 / 4 = 1\n6 / 2 = 3\n3 - 1 = 2\nThe answer is 2"),  # repeated numbers, target 2 made
])
def test_valid_solutions(numbers, target, completion):
    assert validate_countdown(numbers, target, completion) is None


@pytest.mark.parametrize("numbers,target,completion,reason", [
    ((10, 2, 7), 40, "10 * 2 = 20\n20 * 2 = 40\nThe answer is 40", "2 is not available"),  # reused number
    ((25, 5, 3), 60, "25 + 5 = 30\n30 + 30 = 60\nThe answer is 60", "30 is not available"),  # reused result
    ((25, 5, 3), 60, "25 - 4 = 21\n21 * 3 = 63\nThe answer is 60", "4 is not available"),  # never given
    ((25, 5, 3), 60, "25 - 5 = 21\n21 * 3 = 63\nThe answer is 63", "is 20, not 21"),  # wrong arithmetic
    ((25, 5, 3), 60, "25 - 5 = 20\n20 * 3 = 60\nThe answer is 61", "not the target"),  # wrong target
    ((25, 5, 3), 60, "25 + 5 = 30\nThe answer is 60", "never reached"),  # claims the target
    ((25, 5, 3), 60, "25 - 5 = 20\n20 * 3 = 60\n60 - 3 = 57\nThe answer is 60", "3 is not available"),
    ((25, 5, 3), 60, "25 / 3 = 8\nThe answer is 60", "not a positive integer"),  # inexact division
    ((25, 5, 3), 60, "5 - 5 = 0\nThe answer is 60", "5 is not available"),
    ((25, 5, 5), 60, "5 - 5 = 0\nThe answer is 60", "not a positive integer"),  # results must be positive
    ((25, 5, 3), 60, "5 - 25 = -20\nThe answer is 60", "is not 'a op b = c'"),
    ((25, 5, 3), 60, "25 - 5 is 20\n20 * 3 = 60\nThe answer is 60", "is not 'a op b = c'"),
    ((25, 5, 3), 60, "25 - 5 = 20\n20 * 3 = 60", "last line"),  # no final answer
    ((25, 5, 3), 60, "25 - 5 = 20\n20 * 3 = 60\nThe answer is 60\nbye", "step 3 is not"),
    ((25, 5, 3), 60, "The answer is (25 - 5) * 3", "last line"),
    ((25, 5, 3), 60, "\n \n", "empty"),
])
def test_invalid_solutions_are_rejected(numbers, target, completion, reason):
    error = validate_countdown(numbers, target, completion)
    assert error is not None and reason in error, error
    problem = Problem("p", "", str(target), meta={"numbers": numbers, "target": target})
    assert not CountdownTask().is_correct(problem, completion)
