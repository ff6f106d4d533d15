"""The unbiased Best-of-k estimator against a brute-force average over every k-subset, pass@k and majority@k."""

import itertools

import numpy as np
import pytest

from jaxreason.search.votes import majority_of_groups
from jaxreason.verifiers.best_of_k import best_of_k, best_of_k_curves, best_of_k_weights, majority_at_k, pass_at_k


def _brute_force(scores, correct, k, pick):
    """The mean over problems and over all k-subsets of the correctness of `pick(subset)`'s sample."""
    per_problem = []
    for s, c in zip(scores, correct):
        subsets = list(itertools.combinations(range(len(s)), k))
        per_problem.append(np.mean([c[pick(s, subset)] for subset in subsets]))
    return float(np.mean(per_problem))


def _highest_first_seen(s, subset):
    return max(subset, key=lambda i: (s[i], -i))  # the highest score; equal scores: the earlier sample


def _random_case(seed, problems=5, n=7):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(problems, n)).astype(float)  # few levels: many ties
    correct = rng.random((problems, n)) < 0.4
    return scores, correct


@pytest.mark.parametrize("seed", range(4))
def test_best_of_k_equals_the_average_over_all_subsets(seed):
    scores, correct = _random_case(seed)
    for k in range(1, scores.shape[1] + 1):
        assert best_of_k(scores, correct, k) == pytest.approx(_brute_force(scores, correct, k, _highest_first_seen))


@pytest.mark.parametrize("seed", range(3))
def test_pass_at_k_equals_the_average_over_all_subsets(seed):
    _, correct = _random_case(seed)
    for k in range(1, correct.shape[1] + 1):
        brute = float(np.mean([np.mean([c[list(sub)].any() for sub in itertools.combinations(range(len(c)), k)])
                               for c in correct]))
        assert pass_at_k(correct, k) == pytest.approx(brute)


def test_majority_at_k_equals_the_average_over_all_subsets_when_they_are_few():
    rng = np.random.default_rng(0)
    groups = rng.integers(-1, 3, size=(4, 6))
    correct = groups == 0
    for k in (1, 3, 6):
        brute = float(np.mean([np.mean([c[list(sub)][majority_of_groups(_renumber(g[list(sub)]))]
                                        for sub in itertools.combinations(range(6), k)])
                               for g, c in zip(groups, correct)]))
        assert majority_at_k(groups, correct, k, max_subsets=100) == pytest.approx(brute)


def _renumber(groups):
    seen = {}
    return np.asarray([seen.setdefault(int(g), len(seen)) if g >= 0 else -1 for g in groups])


def test_weights_sum_to_one_and_favour_the_best():
    for n, k in ((8, 1), (8, 3), (8, 8), (16, 4)):
        w = best_of_k_weights(n, k)
        assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w) <= 0) and np.all(w[n - k + 1:] == 0)
    assert best_of_k_weights(5, 5)[0] == 1.0  # k = N: always the best


def test_a_perfect_verifier_reaches_pass_at_k_and_a_reversed_one_falls_below_random():
    _, correct = _random_case(7, problems=20, n=8)
    perfect, reversed_ = correct.astype(float), (~correct).astype(float)
    mean = correct.mean()
    for k in range(1, 9):
        assert best_of_k(perfect, correct, k) == pytest.approx(pass_at_k(correct, k))
        assert best_of_k(reversed_, correct, k) <= mean + 1e-12
    assert best_of_k(np.zeros(correct.shape), correct, 1) == pytest.approx(mean)


def test_k_larger_than_n_or_mismatched_shapes_are_clear_errors():
    scores, correct = _random_case(0, n=4)
    with pytest.raises(ValueError, match="1 <= k <= N.*k = 5, N = 4"):
        best_of_k(scores, correct, 5)
    with pytest.raises(ValueError, match="k = 0"):
        pass_at_k(correct, 0)
    with pytest.raises(ValueError, match=r"must both be \[P, N\]"):
        best_of_k(scores[:, :3], correct, 2)


def test_curves_hold_every_verifier_majority_and_pass():
    scores, correct = _random_case(1)
    groups = np.where(correct, 0, 1)
    curves = best_of_k_curves(correct, groups, {"v": scores})
    assert set(curves) == {"v", "majority", "pass"}
    assert list(curves["pass"]) == list(range(1, 8))
    assert curves["v"][3] == pytest.approx(best_of_k(scores, correct, 3))
