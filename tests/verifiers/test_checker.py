"""The task-check verifier (the task's process labels as scores, blurred by noise) and `evaluate_verifier`."""

import jax
import numpy as np
import pytest
import tiny
from tiny import TOKENIZER

from jaxreason.sampling import SamplingConfig, prompt_ids
from jaxreason.tasks import get_task
from jaxreason.tasks.base import Problem
from jaxreason.verifiers import StepSplitter, TaskCheckVerifier, score_solutions
from jaxreason.verifiers.evaluation import evaluate_verifier

TASK = get_task("arith", check_steps=True)
PROBLEM = Problem(id="p", question="What is 12 + 7 * 3 - 5?", answer="28")
SOLUTIONS = {
    "7 * 3 = 21\n12 + 21 = 33\n33 - 5 = 28\nThe answer is 28": [1, 1, 1, 1],
    "7 * 3 = 22\n12 + 22 = 34\n34 - 5 = 29\nThe answer is 29": [0, 0, 0, 0],
    "7 * 3 = 21\n12 + 21 = 33\n33 - 5 = 27\nThe answer is 27": [1, 1, 0, 0],
}


def _score(verifier):
    prompt = prompt_ids(TOKENIZER, TASK.prompt(PROBLEM))
    solutions = [TOKENIZER.encode(s, add_special_tokens=False) + [TOKENIZER.eos_token_id] for s in SOLUTIONS]
    return score_solutions(verifier, [prompt] * len(solutions), solutions, StepSplitter(TOKENIZER, "\n"),
                           pad_id=TOKENIZER.pad_token_id)


def test_scores_follow_the_process_labels():
    scored = _score(TaskCheckVerifier(TASK, TOKENIZER, [PROBLEM]))
    for got, labels in zip(scored.step_scores, SOLUTIONS.values()):
        np.testing.assert_allclose(got, np.where(np.array(labels) == 1, 0.953, 0.047), atol=1e-3)
    assert scored.prompt_scores[0] == pytest.approx(0.953, abs=1e-3)  # nothing wrong yet


def test_noise_blurs_the_same_text_the_same_way():
    a, b = (_score(TaskCheckVerifier(TASK, TOKENIZER, [PROBLEM], noise=3.0, seed=1)) for _ in range(2))
    np.testing.assert_array_equal(a.scores, b.scores)
    clean = _score(TaskCheckVerifier(TASK, TOKENIZER, [PROBLEM]))
    assert not np.allclose(a.scores, clean.scores)


def test_it_needs_process_labels_and_a_known_prompt():
    with pytest.raises(ValueError, match="no process labels"):
        TaskCheckVerifier(get_task("countdown"), TOKENIZER, [])
    unknown = TaskCheckVerifier(TASK, TOKENIZER, [])
    assert (_score(unknown).scores == 0).all()


def test_evaluate_verifier_on_a_perfect_verifier():
    policy = tiny.policy(0)
    task = get_task("arith", max_ops=1, check_steps=True)
    problems = task.problems("test", n=3, seed=0)
    out = evaluate_verifier(policy, TaskCheckVerifier(task, TOKENIZER, problems), TOKENIZER, task, problems,
                            sampling=SamplingConfig(max_new_tokens=24, temperature=1.0), num_samples=4,
                            sizes=(1, 4), key=jax.random.key(0))
    rules = out["selection"]["4"]
    assert rules["best_of_n"] == rules["pass_at_n"]  # a perfect verifier picks a correct sample when there is one
    assert out["selection"]["1"]["best_of_n"] == out["selection"]["1"]["random_pick"]
    assert {"auc", "first_error", "tokens_per_sample", "verifier_tokens_per_sample"} <= set(out)
