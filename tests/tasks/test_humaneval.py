"""HumanEval: the problems, the split, and grading completions (continuations and chat answers) in the sandbox."""

import time

import pytest

from jaxreason.search.votes import group_answers
from jaxreason.tasks import HumanEvalTask, get_task, load_humaneval
from jaxreason.tasks.humaneval import build_program, completion_code

CORRECT_BODY = """\
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
"""


@pytest.fixture(scope="module")
def task():
    return get_task("humaneval", workers=2)


@pytest.fixture(scope="module")
def problems(task):
    return task.problems("test")


def test_all_problems_load_with_ids_and_entry_points(task, problems):
    assert isinstance(task, HumanEvalTask)
    assert [p.id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert p.answer == p.meta["entry_point"] and f"def {p.answer}(" in p.question
        assert "def check(candidate)" in p.meta["test"]
        assert "\n".join(p.solution_steps) == p.meta["canonical_solution"].rstrip("\n")
        assert task.prompt(p) == p.question  # base models continue the function body


def test_only_the_test_split_and_seeded_prefix_samples(task, problems):
    with pytest.raises(ValueError, match="only the 'test' split.*'train'"):
        task.problems("train")
    three, ten = task.problems("test", n=3, seed=1), task.problems("test", n=10, seed=1)
    assert three == ten[:3] and three == task.problems("test", n=3, seed=1) and three != task.problems(n=3, seed=2)
    assert {p.id for p in task.problems("test", n=164)} == {p.id for p in problems}
    with pytest.raises(ValueError, match="165"):
        task.problems("test", n=165)


def test_problems_set_aside_for_training_leave_the_test_split():
    task = HumanEvalTask(train_problems=100)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) == 100 and len(test) == 64 and not {p.id for p in train} & {p.id for p in test}
    assert [p.id for p in HumanEvalTask(train_problems=100).problems("train")] == [p.id for p in train]  # fixed
    assert {p.id for p in task.problems("train", n=10, seed=3)} <= {p.id for p in train}


def test_prompt_template_wraps_the_problem(problems):
    chat_task = get_task("humaneval", prompt_template="Complete this function:\n```python\n{question}```\n")
    assert chat_task.prompt(problems[0]) == f"Complete this function:\n```python\n{problems[0].question}```\n"


def test_every_canonical_solution_passes(task, problems):
    """All 164 (about 10 s on two busy cores with two workers)."""
    solutions = [task.format_solution(p.solution_steps, p.answer) for p in problems]
    failed = [p.id for p, ok in zip(problems, task.check_many(problems, solutions)) if not ok]
    assert failed == []


def test_a_wrong_body_fails(task, problems):
    assert task.is_correct(problems[0], CORRECT_BODY)
    assert not task.is_correct(problems[0], "    return False\n")
    assert not task.is_correct(problems[0], "")
    assert not task.is_correct(problems[0], "    return (\n")  # a syntax error


def test_a_continuation_is_cut_at_the_next_top_level_statement(task, problems):
    trailing = "\n\ndef unused():\n    pass\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n"
    assert completion_code(CORRECT_BODY + trailing) == CORRECT_BODY.rstrip()
    assert task.is_correct(problems[0], CORRECT_BODY + trailing)
    program = build_program(problems[0], CORRECT_BODY + trailing)
    assert program.startswith(problems[0].question + CORRECT_BODY.rstrip())
    assert program.rstrip().endswith("check(has_close_elements)")


def test_a_fenced_chat_answer_is_graded(task, problems):
    chat = ("Here is the function:\n\n```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: "
            f"List[float], threshold: float) -> bool:\n{CORRECT_BODY}```\n\nIt compares every pair once.")
    assert task.is_correct(problems[0], chat)
    assert not task.is_correct(problems[0], chat.replace("return True", "return 1 > 2"))
    assert task.is_correct(problems[0], f"```python\n{CORRECT_BODY}```")  # a body alone continues the prompt
    # An answer that begins with code and only closes a fence: the fence and the prose after it are cut.
    unopened = f"def has_close_elements(numbers, threshold):\n{CORRECT_BODY}```\n\nThis compares every pair."
    assert completion_code(unopened).endswith("return False") and task.is_correct(problems[0], unopened)
    # A redefinition keeps the prompt's helpers: decode_cyclic needs the prompt's encode_cyclic.
    cyclic = problems[38]
    assert task.is_correct(cyclic, "```py\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```")


def test_an_infinite_loop_fails_within_the_timeout(problems):
    start = time.monotonic()
    assert not get_task("humaneval", timeout_s=1.0).is_correct(problems[0], "    while True:\n        pass\n")
    assert time.monotonic() - start < 3.0


def test_answers_are_code_and_group_without_crashing(task):
    answers = [task.extract_answer(c) for c in (CORRECT_BODY, CORRECT_BODY + "\n\n# note", "", "   \n  ",
                                                "    return False\n")]
    assert answers[0] == answers[1] == CORRECT_BODY.rstrip() and answers[2] is None and answers[3] is None
    assert group_answers(answers).tolist() == [0, 0, -1, -1, 1]


def test_solution_format_and_batch_checks(task, problems):
    assert task.format_solution(("    return 1",), "f") == "    return 1"
    assert not task.is_final_step("The answer is 5") and task.step_delimiter == "\n"
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        task.check_many(problems[:2], [""])
    assert len(load_humaneval()) == 164
