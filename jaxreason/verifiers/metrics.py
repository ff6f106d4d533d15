"""How well a verifier verifies: ranking (AUC), selection among N samples against the verifier-free rules, and
where a PRM places the first wrong step. Pure host functions."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from jaxreason.search.votes import best_of, majority_of_groups, weighted_vote_of_groups

SELECTION_RULES = ("best_of_n", "weighted_vote", "self_consistency", "random_pick", "pass_at_n")


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half): the area under the
    ROC curve. None when either class is empty."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return None
    ranks = _average_ranks(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def within_problem_auc(scores: np.ndarray, correct: np.ndarray) -> float | None:
    """The mean `roc_auc` over the problems (rows of [P, N] scores and correctness) that have both correct and
    incorrect samples: how well a verifier ranks the samples of one problem, which is what best-of-N rewards.
    None when no problem has both."""
    aucs = [a for s, c in zip(scores, correct) if (a := roc_auc(s, c)) is not None]
    return float(np.mean(aucs)) if aucs else None


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def selection_accuracy(groups: np.ndarray, correct: np.ndarray, scores: np.ndarray, n: int,
                       max_subsets: int = 70, seed: int = 0) -> dict[str, float]:
    """Accuracy of each rule in `SELECTION_RULES` when it picks one of n samples, averaged over problems and over
    subsets of n of each problem's N samples: the mean over problems of `selection_correct`."""
    return {rule: float(x.mean()) for rule, x in selection_correct(groups, correct, scores, n, max_subsets,
                                                                   seed).items()}


def selection_correct(groups: np.ndarray, correct: np.ndarray, scores: np.ndarray, n: int,
                      max_subsets: int = 70, seed: int = 0) -> dict[str, np.ndarray]:
    """Each problem's accuracy under each rule in `SELECTION_RULES` when it picks one of n samples, averaged over
    subsets of n of the problem's N samples (all of them when there are at most `max_subsets`, else that many
    drawn at random, the same subsets for every problem): an estimate of the rule's accuracy with n samples that
    uses all N drawn.

    Args:
      groups: [P, N] answer group of each sample (`group_answers` per problem; -1: no answer).
      correct: [P, N] whether each sample is correct.
      scores: [P, N] the verifier's score of each sample.
      n: samples per selection, 1 <= n <= N.

    Returns:
      {rule: [P] float64}. Rules: best_of_n (highest score), weighted_vote (answer with the highest sum of
      scores), self_consistency (majority answer), random_pick (a uniformly random sample: the mean accuracy) and
      pass_at_n (any correct).
    """
    groups, correct, scores = np.asarray(groups), np.asarray(correct, bool), np.asarray(scores, np.float64)
    p, total = correct.shape
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    subsets = list(itertools.combinations(range(total), n))
    if len(subsets) > max_subsets:
        rng = np.random.default_rng(seed)
        subsets = [tuple(sorted(rng.choice(total, n, replace=False))) for _ in range(max_subsets)]
    sums = {rule: np.zeros(p) for rule in SELECTION_RULES}
    for b in range(p):
        for subset in subsets:
            idx = np.asarray(subset)
            g, c, s = _relabel(groups[b, idx]), correct[b, idx], scores[b, idx]
            sums["best_of_n"][b] += c[best_of(s)]
            sums["weighted_vote"][b] += c[weighted_vote_of_groups(g, s)]
            sums["self_consistency"][b] += c[majority_of_groups(g)]
            sums["random_pick"][b] += c.mean()
            sums["pass_at_n"][b] += c.any()
    return {rule: total_ / len(subsets) for rule, total_ in sums.items()}


def _relabel(groups: np.ndarray) -> np.ndarray:
    """Groups renumbered by first appearance in this subset (the votes' tie rule is "seen first")."""
    out, seen = np.full(len(groups), -1, np.int64), {}
    for i, g in enumerate(groups):
        if g >= 0:
            out[i] = seen.setdefault(int(g), len(seen))
    return out


def first_error_accuracy(step_scores: Sequence[np.ndarray], first_wrong: Sequence[int | None],
                         threshold: float | None = None,
                         start_scores: Sequence[float] | None = None) -> dict[str, float | None]:
    """How often a PRM finds the first wrong step where process labels put it.

    The PRM's first wrong step is the first step scored below `threshold` (a PRM whose values estimate the
    chance of success), or, with `threshold` None, the first step scored below the step before it (`start_scores`:
    the score before the first step; a PRM whose values grow with progress, as ReST-MCTS*'s do); None if none
    is. Returns the accuracy on solutions with a wrong step (the PRM names that step), on solutions without one
    (the PRM names none), and their harmonic mean (ProcessBench's F1); None where a kind has no solution.
    """
    if threshold is None and start_scores is None:
        raise ValueError("give a threshold, or the scores before the first step (start_scores)")
    hits = {"erroneous": [], "error_free": []}
    for i, (scores, truth) in enumerate(zip(step_scores, first_wrong)):
        scores = np.asarray(scores)
        if threshold is None:
            below = np.flatnonzero(scores < np.concatenate([[start_scores[i]], scores[:-1]]))
        else:
            below = np.flatnonzero(scores < threshold)
        predicted = int(below[0]) if len(below) else None
        hits["erroneous" if truth is not None else "error_free"].append(predicted == truth)
    out = {kind: (float(np.mean(h)) if h else None) for kind, h in hits.items()}
    a, b = out["erroneous"], out["error_free"]
    out["f1"] = None if a is None or b is None or a + b == 0 else 2 * a * b / (a + b)
    return out
