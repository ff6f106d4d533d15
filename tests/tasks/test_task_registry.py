"""The task registry and the Task base: prompts, final-answer lines, step delimiter."""

import pytest

from jaxreason.tasks import ANSWER_PREFIX, STEP_DELIMITER, ArithTask, Problem, get_task, register_task, task_names


def test_builtin_tasks_are_registered():
    assert {"arith", "countdown", "gsm8k", "math"} <= set(task_names())
    assert isinstance(get_task("arith", max_ops=2), ArithTask)
    assert get_task("arith", max_ops=2).max_ops == 2


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*arith.*countdown.*gsm8k.*math"):
        get_task("nope")


def test_register_task_and_duplicates():
    register_task("test-registry-arith", lambda **kw: ArithTask(min_ops=2, **kw))
    assert get_task("test-registry-arith", max_ops=5).min_ops == 2
    with pytest.raises(ValueError, match="already registered"):
        register_task("arith", ArithTask)


def test_prompt_solution_format_and_final_step():
    task = get_task("arith")
    problem = Problem(id="p", question="What is 2 + 3?", answer="5", solution_steps=("2 + 3 = 5",))
    assert STEP_DELIMITER == "\n" and ANSWER_PREFIX == "The answer is "
    assert task.prompt(problem) == "Q: What is 2 + 3?\n"
    solution = task.format_solution(problem.solution_steps, problem.answer)
    assert solution == "2 + 3 = 5\nThe answer is 5"
    assert task.is_correct(problem, solution)
    assert not task.is_correct(problem, "2 + 3 = 6\nThe answer is 6")
    assert task.is_final_step("The answer is 5") and not task.is_final_step("2 + 3 = 5")


def test_prompt_template_override():
    task = get_task("arith", prompt_template="Problem: {question}\nSolution:\n")
    assert task.prompt(Problem("p", "What is 1 + 1?", "2")) == "Problem: What is 1 + 1?\nSolution:\n"
    with pytest.raises(ValueError, match="question"):
        get_task("arith", prompt_template="no placeholder")


def test_problem_is_frozen_and_hashable_with_meta():
    problem = Problem("p", "q", "1", meta={"level": "Level 1"})
    assert hash(problem) == hash(Problem("p", "q", "1", meta={"other": 2}))
    with pytest.raises(AttributeError):
        problem.answer = "2"
