"""Verifier metrics on hand-made inputs and against brute force; the verifier interface's aggregation and
registry; the step rule."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.search.votes import majority_vote, weighted_vote
from jaxreason.verifiers import (
    StepSplitter,
    aggregate,
    combine,
    first_error_accuracy,
    initial_score,
    make_verifier,
    roc_auc,
    selection_accuracy,
    verifier_names,
)


def test_roc_auc_is_the_pairwise_ranking_probability():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=40), 1)  # many ties
    labels = rng.uniform(size=40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(want)
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert roc_auc([0.1, 0.2], [True, True]) is None


def test_selection_accuracy_averages_every_subset():
    answers = [["4", "4", "5", "6"], ["1", "2", "2", "2"]]
    correct = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    scores = np.array([[0.2, 0.3, 0.9, 0.1], [0.6, 0.5, 0.1, 0.1]])
    groups = np.array([[0, 0, 1, 2], [0, 1, 1, 1]])
    for n in (1, 2, 3, 4):
        got = selection_accuracy(groups, correct, scores, n)
        want = {k: [] for k in got}
        for b in range(2):
            for subset in itertools.combinations(range(4), n):
                idx = list(subset)
                a, c, s = [answers[b][i] for i in idx], correct[b, idx], scores[b, idx]
                want["best_of_n"].append(c[int(np.argmax(s))])
                want["weighted_vote"].append(c[weighted_vote(a, s)])
                want["self_consistency"].append(c[majority_vote(a)])
                want["random_pick"].append(c.mean())
                want["pass_at_n"].append(c.any())
        for rule, values in want.items():
            assert got[rule] == pytest.approx(np.mean(values)), (n, rule)
    # n = 4 on problem 0: weighted vote sums 0.5 for "4" against 0.9 for "5" and picks the wrong answer
    assert selection_accuracy(groups[:1], correct[:1], scores[:1], 4)["weighted_vote"] == 0.0


def test_first_error_accuracy():
    step_scores = [np.array([0.9, 0.2, 0.1]), np.array([0.9, 0.8]), np.array([0.3, 0.9]), np.array([0.8, 0.7])]
    first_wrong = [1, None, 1, 0]
    got = first_error_accuracy(step_scores, first_wrong, threshold=0.5)
    assert got["erroneous"] == pytest.approx(1 / 3)  # found at 1; flagged 0 for 1; flagged none for 0
    assert got["error_free"] == 1.0
    assert got["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    # The drop rule: the first step scored below the one before it (the prompt's score before step 0).
    progress = [np.array([0.3, 0.1, 0.0]), np.array([0.3, 0.6, 1.0]), np.array([0.4, 0.6]), np.array([0.0, 0.0])]
    got = first_error_accuracy(progress, [1, None, 1, 0], start_scores=[0.1, 0.1, 0.5, 0.2])
    assert got["erroneous"] == pytest.approx(2 / 3)  # found at 1; flagged 0 for 1 (0.4 < 0.5); found at 0
    assert got["error_free"] == 1.0
    with pytest.raises(ValueError, match="threshold"):
        first_error_accuracy(progress, [1, None, 1, 0])


def test_aggregations_and_their_running_form():
    steps = jnp.array([[0.9, 0.4, 0.7], [0.5, 0.0, 0.0]])
    valid = jnp.array([[True, True, True], [True, False, False]])
    np.testing.assert_allclose(aggregate(steps, valid, "last"), [0.7, 0.5])
    np.testing.assert_allclose(aggregate(steps, valid, "min"), [0.4, 0.5])
    np.testing.assert_allclose(aggregate(steps, valid, "product"), [0.9 * 0.4 * 0.7, 0.5], rtol=1e-6)
    for how in ("last", "min", "product"):
        running = jnp.full(2, initial_score(how))
        for i in range(3):
            running = jnp.where(valid[:, i], combine(running, steps[:, i], how), running)
        np.testing.assert_allclose(running, aggregate(steps, valid, how), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate(steps, valid, "mean")


def test_registry_names_and_errors():
    assert {"prm", "orm"} <= set(verifier_names())
    with pytest.raises(ValueError, match="unknown verifier 'judge'; known: (.+, )?orm, prm"):
        make_verifier("judge", None)


def test_step_splitter_follows_the_delimiter_bytes():
    tokenizer = build_char_tokenizer()
    split = StepSplitter(tokenizer, "\n")
    ids = tokenizer.encode("1 + 2 = 3\n\nThe answer is 3", add_special_tokens=False) + [tokenizer.eos_token_id]
    # "\n" ends a step at its own token; the empty second line is a step; the EOS ends the last one
    np.testing.assert_array_equal(split(ids), [10, 11, len(ids)])
    np.testing.assert_array_equal(split(ids, max_steps=2), [10, len(ids)])
    np.testing.assert_array_equal(StepSplitter(tokenizer, "\n\n")(ids), [11, len(ids)])
    assert len(split([])) == 0
