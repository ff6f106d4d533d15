"""Choosing one of N sampled solutions by their answers and scores: majority vote, verifier-weighted vote and
best-of-N. Pure host functions on one problem's samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxreason.tasks.math_answers import answers_equal


def group_answers(answers: Sequence[str | None]) -> np.ndarray:
    """[N] int64 group of each answer, -1 for None; groups are numbered in order of first appearance.

    An answer joins the first group whose first answer it equals (`answers_equal`), so the grouping is
    well defined even where that equivalence is not transitive.
    """
    firsts: list[str] = []
    groups = np.full(len(answers), -1, np.int64)
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        groups[i] = next((g for g, first in enumerate(firsts) if answers_equal(answer, first)), len(firsts))
        if groups[i] == len(firsts):
            firsts.append(answer)
    return groups


def best_of(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the earliest sample."""
    return int(np.argmax(np.asarray(scores)))


def majority_vote(answers: Sequence[str | None]) -> int:
    """Index of the sample that represents the most frequent answer: that answer's first sample.

    Ties go to the answer seen first; samples without an answer do not vote. With no answer at all, 0.
    """
    return majority_of_groups(group_answers(answers))


def majority_of_groups(groups: np.ndarray) -> int:
    """`majority_vote` on answer groups already formed (`group_answers`; -1: no answer)."""
    groups = np.asarray(groups)
    if np.all(groups < 0):
        return 0
    winner = int(np.argmax(np.bincount(groups[groups >= 0])))  # argmax keeps the first of equal counts
    return int(np.flatnonzero(groups == winner)[0])


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float]) -> int:
    """Index of the best-scored sample of the answer whose samples' scores sum highest.

    Ties between sums go to the answer seen first; samples without an answer do not vote. With no answer
    at all, the best-scored sample.
    """
    return weighted_vote_of_groups(group_answers(answers), scores)


def weighted_vote_of_groups(groups: np.ndarray, scores: Sequence[float]) -> int:
    """`weighted_vote` on answer groups already formed (`group_answers`; -1: no answer)."""
    groups, scores = np.asarray(groups), np.asarray(scores, np.float64)
    if np.all(groups < 0):
        return best_of(scores)
    voting = groups >= 0
    winner = int(np.argmax(np.bincount(groups[voting], weights=scores[voting])))
    members = np.flatnonzero(groups == winner)
    return int(members[best_of(scores[members])])
