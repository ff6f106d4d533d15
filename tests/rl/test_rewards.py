"""Rewards from the task's checker and from a verifier, and the errors for a bad reward function."""

import numpy as np
import pytest

from jaxreason.rl.rewards import apply_truncation, checked_rewards, task_reward, verifier_reward
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier
from tests.tiny import PAD, TOKENIZER, value_model

TASK = get_task("arith", max_ops=1, max_operand=9)
PROBLEMS = TASK.problems("train", n=2, seed=0)
PROMPTS = [TOKENIZER.encode(TASK.prompt(p)) for p in PROBLEMS]


def _solution(problem, answer):
    return TOKENIZER.encode(TASK.format_solution(problem.solution_steps[:-1], answer))


def test_task_reward_checks_the_answer():
    completions = [_solution(PROBLEMS[0], PROBLEMS[0].answer), _solution(PROBLEMS[1], "123456")]
    rewards = checked_rewards(task_reward(TASK, TOKENIZER), PROBLEMS, PROMPTS, completions)
    np.testing.assert_array_equal(rewards, [1.0, 0.0])
    assert rewards.dtype == np.float32


def test_task_reward_runs_a_code_task_in_the_sandbox_in_one_batch():
    task = get_task("humaneval", workers=2)
    problem = task.problems("test", n=1, seed=0)[0]
    right, wrong = problem.meta["canonical_solution"], "    return None\n"
    rewards = checked_rewards(task_reward(task, TOKENIZER), [problem, problem], [[], []],
                              [TOKENIZER.encode(right), TOKENIZER.encode(wrong)])
    np.testing.assert_array_equal(rewards, [1.0, 0.0])


def test_verifier_reward_is_the_verifiers_score_in_unit_interval():
    completions = [_solution(p, p.answer) for p in PROBLEMS]
    rewards = checked_rewards(verifier_reward(ValueVerifier(value_model()), TOKENIZER, TASK, pad_id=PAD),
                              PROBLEMS, PROMPTS, completions)
    assert rewards.shape == (2,) and np.all((rewards > 0) & (rewards < 1))


@pytest.mark.parametrize("returned, message", [
    ([1.0, float("nan")], r"reward function broken returned nan for problem '.*' \(row 1\)"),
    ([1.0], r"reward function broken returned shape \(1,\) for 2 completions"),
    (["yes", "no"], "reward function broken returned list, not numbers"),
    ([[1.0], [0.0]], r"shape \(2, 1\)"),
])
def test_bad_rewards_name_the_function_and_the_problem(returned, message):
    def broken(problems, prompts, completions):
        return returned

    with pytest.raises(ValueError, match=message):
        checked_rewards(broken, PROBLEMS, PROMPTS, [[1], [2]])


def test_truncation_rules():
    rewards, truncated = np.asarray([1.0, 1.0, 0.0], np.float32), np.asarray([False, True, True])
    r, keep = apply_truncation(rewards, truncated, "zero")
    np.testing.assert_array_equal(r, [1, 0, 0])
    np.testing.assert_array_equal(keep, [1, 1, 1])
    r, keep = apply_truncation(rewards, truncated, "mask")
    np.testing.assert_array_equal(r, rewards)
    np.testing.assert_array_equal(keep, [1, 0, 0])
    r, keep = apply_truncation(rewards, truncated, "keep")
    np.testing.assert_array_equal(r, rewards)
    np.testing.assert_array_equal(keep, [1, 1, 1])
    with pytest.raises(ValueError, match="unknown truncation rule 'drop'"):
        apply_truncation(rewards, truncated, "drop")
