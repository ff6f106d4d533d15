"""Generated arithmetic: determinism, disjoint splits, difficulty knobs, gold solutions, char-tokenizer fit."""

import re

import pytest

from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.tasks import ArithTask
from jaxreason.tasks.arith import equation_holds
from jaxreason.tasks.base import Problem
from jaxreason.tasks.procedural import split_of

UNK_ID = 3
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def expression(question: str) -> str:
    return re.fullmatch(r"What is (.+)\?", question)[1]


def test_deterministic_and_prefix_stable():
    task = ArithTask()
    first = task.problems("train", 200, seed=3)
    assert first == ArithTask().problems("train", 200, seed=3)
    assert first[:50] == task.problems("train", 50, seed=3)
    assert [p.question for p in first] != [p.question for p in task.problems("train", 200, seed=4)]
    assert len({p.question for p in first}) == len(first) == len({p.id for p in first})


def test_train_and_test_never_overlap_whatever_the_seeds():
    task = ArithTask()
    train = {p.question for seed in (0, 1) for p in task.problems("train", 2000, seed=seed)}
    test = {p.question for seed in (0, 1) for p in task.problems("test", 300, seed=seed)}
    assert not train & test
    assert all(split_of(q, task.test_fraction) == "test" for q in test)
    with pytest.raises(ValueError, match="split"):
        task.problems("validation", 10)


@pytest.mark.parametrize("ops", [1, 2, 4])
def test_number_of_operations_sets_the_number_of_steps(ops):
    problems = ArithTask(min_ops=ops, max_ops=ops).problems("train", 100)
    assert all(len(p.solution_steps) == ops == p.meta["num_ops"] for p in problems)
    assert all(len(re.findall(r" [-+*/] ", p.question)) == ops for p in problems)


def test_operand_range_and_operations():
    problems = ArithTask(max_operand=9, max_factor=5, ops="+-").problems("train", 300)
    numbers = [int(x) for p in problems for x in re.findall(r"\d+", p.question)]
    assert max(numbers) == 9 and min(numbers) >= 1
    assert all("*" not in p.question and "/" not in p.question for p in problems)
    products = ArithTask(ops="*", max_factor=5).problems("train", 100)
    assert {int(x) for p in products for x in re.findall(r"\d+", p.question)} <= set(range(2, 6))


@pytest.mark.parametrize("ops", ["+-*", "+-*/"])
def test_gold_solutions_are_correct(ops):
    task = ArithTask(max_ops=4, ops=ops)
    for p in task.problems("train", 1000):
        # Python's precedence is the grammar's; every division in the expression is exact.
        assert int(p.answer) == eval(expression(p.question).replace("/", "//"))
        for step in p.solution_steps:
            a, op, b, c = STEP.fullmatch(step).groups()
            assert int(c) == eval(f"{a} {op.replace('/', '//')} {b}") >= 0
            assert op != "/" or int(a) % int(b) == 0
        solution = task.format_solution(p.solution_steps, p.answer)
        assert solution.endswith(f"\nThe answer is {p.answer}")
        assert task.is_correct(p, solution)
        assert not task.is_correct(p, task.format_solution(p.solution_steps, str(int(p.answer) + 1)))


def test_texts_are_short_ascii_and_char_tokenizable():
    task = ArithTask()
    tokenizer = build_char_tokenizer()
    problems = task.problems("train", 1000) + task.problems("test", 100)
    for p in problems:
        prompt, solution = task.prompt(p), task.format_solution(p.solution_steps, p.answer)
        assert len(prompt) < 60 and len(solution) < 80
        assert UNK_ID not in tokenizer.encode(prompt + solution)


def test_exhausted_problem_space_is_an_error():
    # Only 1 + 1, 1 + 2, 2 + 1 and 2 + 2 exist.
    with pytest.raises(ValueError, match="distinct"):
        ArithTask(max_ops=1, max_operand=2, ops="+").problems("train", 10)


@pytest.mark.parametrize("kwargs", [dict(min_ops=0), dict(min_ops=3, max_ops=2), dict(ops="+x"), dict(ops=""),
                                    dict(max_factor=1), dict(test_fraction=1.0)])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ArithTask(**kwargs)


def test_check_steps_rejects_a_right_answer_reached_through_a_wrong_step():
    task = ArithTask(check_steps=True)
    problem = Problem(id="x", question="What is 2 + 1 + 5?", answer="8", solution_steps=("2 + 1 = 3", "3 + 5 = 8"))
    assert task.is_correct(problem, "2 + 1 = 3\n3 + 5 = 8\nThe answer is 8")
    assert not task.is_correct(problem, "2 + 1 = 5\n5 + 5 = 8\nThe answer is 8")  # the answer alone is right
    assert not task.is_correct(problem, "2 + 1 = 3\nthree plus five\nThe answer is 8")
    assert not task.is_correct(problem, "2 + 1 = 3\n3 + 5 = 9\nThe answer is 9")
    assert ArithTask().is_correct(problem, "2 + 1 = 5\n5 + 5 = 8\nThe answer is 8")
    for p in task.problems("train", n=20):
        assert task.is_correct(p, task.format_solution(p.solution_steps, p.answer))
    assert equation_holds("12 / 4 = 3") and not equation_holds("12 / 5 = 2") and not equation_holds("3 - 5 = -2")


def test_first_wrong_step_is_the_process_label():
    task = ArithTask()
    problem = Problem(id="p", question="What is 12 + 7 * 3 - 5?", answer="28")
    cases = {
        "7 * 3 = 21\n12 + 21 = 33\n33 - 5 = 28\nThe answer is 28": None,
        "7 * 3 = 21\n21 - 5 = 16\n12 + 16 = 28\nThe answer is 28": None,  # another valid order
        "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nThe answer is 52": 0,  # true equation, wrong precedence
        "7 * 3 = 22\n12 + 22 = 34\n34 - 5 = 29\nThe answer is 29": 0,  # false equation
        "7 * 3 = 21\n12 + 21 = 33\nThe answer is 33": 2,  # answers before the expression is reduced
        "7 * 3 = 21\n12 + 21 = 33\n33 - 5 = 28\nThe answer is 27": 3,
        "7 * 3 = 21\nhello": 1,
        "7 * 3 = 21\n": None,  # unfinished, nothing wrong yet
    }
    for completion, want in cases.items():
        assert task.first_wrong_step(problem, task.split_steps(completion)) == want, completion
    assert task.has_process_labels


def test_evaluate_uses_the_usual_precedence():
    from jaxreason.tasks.arith import evaluate, expression_items

    assert evaluate(expression_items("What is 12 + 7 * 3 - 5?")) == 28
    assert evaluate([8, "/", 3]) is None
    assert evaluate([9, "-", 4, "-", 2]) == 3


def test_last_number_answers_a_completion_without_an_answer_line():
    plain, lenient = ArithTask(), ArithTask(last_number=True)
    assert plain.extract_answer("14 + 7 = 21") is None
    assert lenient.extract_answer("14 + 7 = 21") == "21"
    assert lenient.extract_answer("3 - 5 = -2") == "-2"
    assert lenient.extract_answer("2 + 2 = 4\nThe answer is 5\nso 9") == "5"  # a stated answer wins
    assert lenient.extract_answer("no numbers") is None
