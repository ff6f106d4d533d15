"""ReST-MCTS* per-step value targets inferred from a finished search tree (arXiv 2406.03816, section 3.2).

After a search every terminal leaf is checked against the gold answer. The reasoning distance d_k of node k
is the number of steps from the partial solution before node k's step to a correct answer, node k's step
included:
  - a correct leaf has d = 1;
  - an ancestor of a correct leaf has d = 1 + the least d among its children that have one;
  - any other node (not on a path to a correct leaf, terminal or not) takes the d of its nearest ancestor
    that has one (the root always has one when some leaf is correct).
Values then run top down from v_root = v_0 = 0. For node k with parent value v_{k-1}:
    w_k = (1 - v_{k-1}) / (m_k + 1) * (1 - 2 r_k),    v_k = max(v_{k-1} + w_k, 0),
where m_k + 1 = d_k (m_k: the steps still needed after node k's step; the public code divides by its
`min_steps_to_correct`, our d) and r_k = 0 on a path to a correct leaf (the leaf included), else 1. So each
step on a shortest correct path closes 1/d of the gap to 1, a correct leaf's value is exactly 1, and a step off
every correct path loses as much as it would have gained, clipped at 0. A tree with no correct leaf gives no
targets: there is nothing to measure distance to.

With `finished_only` (the reference's rule: its value samples recurse only into children whose distance is
known, and a distance reaches a node only from a finished leaf below it), a node on no path to a finished
solution, correct or not, gets no target: an expanded partial solution whose subtree never finished says
nothing yet about whether it leads anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jaxtyping import Bool, Float, Int

from jaxreason.data.trace_store import FLAG_CORRECT, FLAG_SEARCH, Trace
from jaxreason.search.traces import SearchPath, TreeTraces


def _distances(parent: np.ndarray, correct_leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(d [N] int, on_path [N] bool) as in the module docstring, or None without a correct leaf."""
    parent = np.asarray(parent)
    correct_leaf = np.asarray(correct_leaf, bool)
    n = len(parent)
    if n == 0 or parent[0] != -1 or (parent[1:] < 0).any() or (parent[1:] >= np.arange(1, n)).any():
        raise ValueError("parent must be -1 at the root (node 0) and smaller than the child's index elsewhere")
    if not correct_leaf.any():
        return None
    none = n + 1  # longer than any path
    d = np.where(correct_leaf, 1, none)
    for k in range(n - 1, 0, -1):  # children before parents
        d[parent[k]] = min(d[parent[k]], d[k] + 1)
    on_path = d < none
    for k in range(1, n):  # parents before children
        if not on_path[k]:
            d[k] = d[parent[k]]
    return d, on_path


def reasoning_distances(
    parent: Int[np.ndarray, " N"], correct_leaf: Bool[np.ndarray, " N"]
) -> Int[np.ndarray, " N"] | None:
    """[N] each node's reasoning distance d (module docstring), or None if no node is a correct leaf.

    parent: [N] each node's parent index, -1 for the root (node 0); a parent's index is below its child's.
    correct_leaf: [N] the node is a terminal leaf with the gold answer.
    """
    found = _distances(parent, correct_leaf)
    return None if found is None else found[0]


def value_targets(
    parent: Int[np.ndarray, " N"], correct_leaf: Bool[np.ndarray, " N"],
    finished_leaf: Bool[np.ndarray, " N"] | None = None,
) -> Float[np.ndarray, " N"] | None:
    """[N] float32 each node's value target v_k (module docstring; the root's is 0), or None if no node is a
    correct leaf. parent, correct_leaf: as in `reasoning_distances`. finished_leaf: [N] the node is a finished
    solution (correct or not); when given, a node with no finished leaf at or below it gets NaN (no target)."""
    found = _distances(parent, correct_leaf)
    if found is None:
        return None
    d, on_path = found
    sign = np.where(on_path, 1.0, -1.0)  # 1 - 2 r_k
    v = np.zeros(len(d), np.float64)
    for k in range(1, len(d)):
        up = v[parent[k]]
        v[k] = max(up + (1.0 - up) / d[k] * sign[k], 0.0)
    if finished_leaf is not None:
        reaches = np.asarray(finished_leaf, bool).copy()
        for k in range(len(parent) - 1, 0, -1):  # children before parents
            reaches[parent[k]] |= reaches[k]
        v[~reaches] = np.nan
    return v.astype(np.float32)


def tree_value_traces(
    traces: TreeTraces, is_correct: Callable[[SearchPath], bool], problem_id: int, iteration: int,
    finished_only: bool = True,
) -> list[Trace]:
    """One `Trace` per leaf path of a search tree, in node order, with the tree's value targets per step.

    traces: one problem's search tree. Its reported nodes (one per `traces.paths` entry) and its sampled
      solutions (finished candidates never expanded: children of their last node, as in the paper's tree,
      where every sampled step is a child) form the tree; a leaf is a node with no child in it.
    is_correct: whether a finished path has the gold answer (called on terminal paths only).
    finished_only: only nodes on a path to a finished solution get targets (`value_targets`); the others'
      steps carry NaN, and a leaf with no target on its path gives no trace.
    Each node's target is given once, in the first trace that passes through it; later traces carry NaN
    for that step (no target), so a shared prefix is not trained once per leaf below it. reward and
    FLAG_CORRECT say whether the leaf is a correct finished solution. Returns [] when none is correct.
    """
    paths = list(traces.paths) + list(traces.sampled_solutions)
    row = {int(p.nodes[-1]): i for i, p in enumerate(traces.paths)}  # mctx node index -> position in `paths`
    # A sampled solution's own node is its position in `paths` (its mctx index is -1).
    steps_of = [[row[int(n)] for n in p.nodes[1:]] for p in traces.paths]
    steps_of += [[row[int(n)] for n in p.nodes[1:-1]] + [len(traces.paths) + i]
                 for i, p in enumerate(traces.sampled_solutions)]
    parent = np.array([steps[-2] if len(steps) > 1 else (0 if steps else -1) for steps in steps_of])
    finished = np.array([bool(p.terminal[-1]) for p in paths])
    correct = np.array([f and bool(is_correct(p)) for f, p in zip(finished, paths)])
    values = value_targets(parent, correct, finished if finished_only else None)
    if values is None:
        return []
    has_child = np.zeros(len(paths), bool)
    has_child[parent[1:]] = True
    given = np.zeros(len(paths), bool)
    out = []
    for leaf in np.flatnonzero(~has_child):
        path, steps = paths[leaf], np.array(steps_of[leaf], int)
        step_values = np.where(given[steps], np.nan, values[steps]).astype(np.float32)
        given[steps] = True
        if np.isnan(step_values).all() and not correct[leaf]:
            continue  # nothing to learn from this path
        out.append(Trace(
            problem_id=problem_id, iteration=iteration, tokens=path.tokens, prompt_len=path.prompt_len,
            step_ends=path.step_ends, step_values=step_values,
            reward=float(correct[leaf]), flags=FLAG_SEARCH | (FLAG_CORRECT if correct[leaf] else 0),
        ))
    return out
