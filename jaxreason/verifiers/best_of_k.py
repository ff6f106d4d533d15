"""Best-of-k, unbiased: the accuracy of picking the verifier's favourite among k samples, estimated from N >= k.

Drawing k of a problem's N samples at random and keeping the best-scored one is correct with probability

    Best-of-k = (1 / C(N, k)) sum_{i=0}^{N-k} C(N-i-1, k-1) alpha_i

where alpha_i is the correctness of the i-th best of the N (V-STaR, Hosseini et al. 2024, eq. 2): the i-th best
is the pick of exactly the C(N-i-1, k-1) subsets that hold it and k-1 of the N-i-1 below it. Equal scores rank by
sample index, the earlier first, so the estimate equals the average over all C(N, k) subsets of the pick under
that rule. pass@k is the same average of "any of the k is correct", 1 - C(N-c, k) / C(N, k) with c correct.
Pure host functions; every input is [P, N] (P problems, N samples each) and every output a mean over problems.
"""

from __future__ import annotations

from math import comb

import numpy as np

from jaxreason.verifiers.metrics import selection_accuracy


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"Best-of-k needs 1 <= k <= N (the samples per problem); got k = {k}, N = {n}")


def best_of_k_weights(n: int, k: int) -> np.ndarray:
    """[N] the chance that the i-th best of n samples is the pick of k random ones: C(n-i-1, k-1) / C(n, k)
    (0 past i = n - k)."""
    _check_k(k, n)
    total = comb(n, k)
    return np.array([comb(n - i - 1, k - 1) / total for i in range(n)])


def best_of_k(scores: np.ndarray, correct: np.ndarray, k: int) -> float:
    """Accuracy of the highest-scored of k random samples (module docstring), averaged over problems.

    Args:
      scores: [P, N] the verifier's score of each sample.
      correct: [P, N] whether each sample is correct.
    """
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must both be [P, N]")
    order = np.argsort(-scores, axis=1, kind="stable")  # best first; equal scores by sample index
    ranked = np.take_along_axis(correct, order, axis=1)
    return float(np.mean(ranked @ best_of_k_weights(scores.shape[1], k)))


def pass_at_k(correct: np.ndarray, k: int) -> float:
    """Chance that some of k random samples is correct, 1 - C(N - c, k) / C(N, k), averaged over problems."""
    correct = np.asarray(correct, bool)
    n = correct.shape[1]
    _check_k(k, n)
    return float(np.mean([1 - comb(n - int(c), k) / comb(n, k) for c in correct.sum(axis=1)]))


def majority_at_k(groups: np.ndarray, correct: np.ndarray, k: int, max_subsets: int = 70, seed: int = 0) -> float:
    """Majority vote among k random samples (ties to the answer seen first), averaged over problems and over
    subsets of k: all C(N, k) when there are at most `max_subsets`, else that many drawn at random.

    Args:
      groups: [P, N] answer group of each sample (`group_answers` per problem; -1: no answer).
    """
    _check_k(k, np.shape(correct)[1])
    return selection_accuracy(groups, correct, np.zeros(np.shape(correct)), k, max_subsets, seed)["self_consistency"]


def best_of_k_curves(correct: np.ndarray, groups: np.ndarray, scores: dict[str, np.ndarray],
                     ks: list[int] | None = None) -> dict[str, dict[int, float]]:
    """{curve: {k: accuracy}} for k in `ks` (default 1..N): Best-of-k of every verifier in `scores`, majority
    vote ("majority") and pass@k ("pass")."""
    ks = ks or list(range(1, np.shape(correct)[1] + 1))
    out = {name: {k: best_of_k(s, correct, k) for k in ks} for name, s in scores.items()}
    out["majority"] = {k: majority_at_k(groups, correct, k) for k in ks}
    out["pass"] = {k: pass_at_k(correct, k) for k in ks}
    return out
