"""ReST-MCTS* value targets: hand-checked trees, and the traces of a real search on the synthetic table."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxreason.algorithms.value_targets import reasoning_distances, tree_value_traces, value_targets
from jaxreason.data.trace_store import FLAG_CORRECT, FLAG_SEARCH
from jaxreason.search.traces import extract_traces

sys.path.insert(0, str(Path(__file__).parents[1] / "search"))  # the synthetic table search of tests/search
import synthetic as S  # noqa: E402

KEY = jax.random.key(0)


def test_paper_four_step_chain():
    parent = np.array([-1, 0, 1, 2, 3])
    correct = np.array([0, 0, 0, 0, 1], bool)
    np.testing.assert_array_equal(reasoning_distances(parent, correct), [5, 4, 3, 2, 1])
    values = value_targets(parent, correct)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)


def test_branching_tree_hand_checked():
    """0 -> 1 -> 2 -> 3 (correct leaf); off path: 2 -> 4 -> 5 -> 6 and 1 -> 7 (an incorrect leaf).

    d: 3: 1, 2: 2, 1: 3, 0: 4; 4, 5, 6 inherit 2's d = 2; 7 inherits 1's d = 3.
    On the path: v1 = 0 + 1/3 = 1/3; v2 = 1/3 + (2/3)/2 = 2/3; v3 = 2/3 + (1/3)/1 = 1.
    Off it: v4 = 2/3 - (1/3)/2 = 1/2; v5 = 1/2 - (1/2)/2 = 1/4; v6 = max(1/4 - (3/4)/2, 0) = 0;
    v7 = 1/3 - (2/3)/3 = 1/9.
    """
    parent = np.array([-1, 0, 1, 2, 2, 4, 5, 1])
    correct = np.zeros(8, bool)
    correct[3] = True
    np.testing.assert_array_equal(reasoning_distances(parent, correct), [4, 3, 2, 1, 2, 2, 2, 3])
    np.testing.assert_allclose(value_targets(parent, correct), [0, 1 / 3, 2 / 3, 1, 1 / 2, 1 / 4, 0, 1 / 9],
                               atol=1e-6)


def test_two_correct_leaves_take_the_nearer():
    """0 -> 1 -> 2 -> 3 (correct) and 1 -> 4 (correct): 1 has d = min(2, 1) + 1 = 2, the root 3.
    v1 = 1/2; v4 = 1/2 + (1/2)/1 = 1; v2 = 1/2 + (1/2)/2 = 3/4; v3 = 3/4 + 1/4 = 1."""
    parent = np.array([-1, 0, 1, 2, 1])
    correct = np.array([0, 0, 0, 1, 1], bool)
    np.testing.assert_array_equal(reasoning_distances(parent, correct), [3, 2, 2, 1, 1])
    np.testing.assert_allclose(value_targets(parent, correct), [0, 1 / 2, 3 / 4, 1, 1], atol=1e-6)


def test_finished_leaf_leaves_out_nodes_that_reach_no_finished_solution():
    """0 -> 1 -> 2 (correct leaf), 1 -> 3 (an expanded partial solution, a leaf), 0 -> 4 -> 5 (a finished,
    incorrect leaf). d: 2: 1, 1: 2, 0: 3; 3 inherits 1's 2, 4 the root's 3, 5 4's 3. v1 = 1/2, v2 = 1,
    v3 = 1/2 - (1/2)/2 = 1/4, v4 = v5 = 0. Given the finished leaves, node 3 reaches none: no target."""
    parent = np.array([-1, 0, 1, 1, 0, 4])
    correct = np.array([0, 0, 1, 0, 0, 0], bool)
    finished = np.array([0, 0, 1, 0, 0, 1], bool)
    np.testing.assert_allclose(value_targets(parent, correct), [0, 1 / 2, 1, 1 / 4, 0, 0], atol=1e-6)
    np.testing.assert_allclose(value_targets(parent, correct, finished), [0, 1 / 2, 1, np.nan, 0, 0], atol=1e-6)
    assert value_targets(parent, np.zeros(6, bool), finished) is None


def test_no_correct_leaf_and_bad_parents():
    parent = np.array([-1, 0, 0, 1])
    assert value_targets(parent, np.zeros(4, bool)) is None
    assert reasoning_distances(parent, np.zeros(4, bool)) is None
    for bad in ([0, 0], [-1, 1], [-1, 0, 3, 0], [-1, -1]):
        with pytest.raises(ValueError, match="parent"):
            value_targets(np.array(bad), np.ones(len(bad), bool))


@pytest.fixture(scope="module")
def hand_tree():
    """The hand-checked tree of tests/search/test_traces.py (the old rule). Reported nodes (table node in
    brackets):
    0 root -> 1 [t1] (a leaf, not terminal), 2 [t2]; 2 -> 3 [t8] (terminal), 4 [t7], 5 [t9];
    4 -> 6 [t23], 7 [t24] (terminal); 5 -> 8 [t28] (terminal). Node 9 is a copy below 8, not reported.
    Sampled solutions (finished candidates never taken): t4 below node 1, t22 below node 4."""
    (row,) = extract_traces(S.searcher("rest_mcts", 9, **S.OLD_RULE)(S.stack([S.fixed_table()]), KEY, 0.0))
    return row


def ends_at(*table_nodes):
    return lambda path: int(path.tokens[-1]) - S.STEP_TOKEN in table_nodes


def test_tree_value_traces_hand_checked(hand_tree):
    """Correct: t8 (node 3) and t28 (node 8). Nodes 9 and 10 are the sampled solutions t4 (below node 1) and
    t22 (below node 4). d: 3, 8: 1; 5: 2; 2: min(1, 2) + 1 = 2; 0: 3; 1 and 9 inherit 3; 4, 6, 7, 10 inherit 2.
    On a path: v2 = 1/2, v3 = 1/2 + 1/2 = 1, v5 = 1/2 + (1/2)/2 = 3/4, v8 = 1. Off: v1 = max(-1/3, 0) = 0,
    v9 = 0; v4 = 1/2 - (1/2)/2 = 1/4; v6 = v7 = v10 = max(1/4 - (3/4)/2, 0) = 0. Every leaf is a finished
    solution, so finished_only (the default) changes nothing here."""
    asked = []

    def is_correct(path):
        asked.append(int(path.nodes[-1]))
        return ends_at(8, 28)(path)

    traces = tree_value_traces(hand_tree, is_correct, problem_id=5, iteration=2)
    assert asked == [3, 6, 7, 8, -1, -1]  # terminal paths only, then the sampled solutions
    paths = hand_tree.paths + hand_tree.sampled_solutions
    leaves = [3, 6, 7, 8, 9, 10]
    assert len(traces) == len(leaves)
    nan = np.nan
    want = [[1 / 2, 1], [nan, 1 / 4, 0], [nan, nan, 0], [nan, 3 / 4, 1], [0, 0], [nan, nan, 0]]
    for trace, leaf, values in zip(traces, leaves, want, strict=True):
        path = paths[leaf]
        np.testing.assert_array_equal(trace.tokens, path.tokens)
        np.testing.assert_array_equal(trace.step_ends, path.step_ends)
        assert trace.prompt_len == path.prompt_len and (trace.problem_id, trace.iteration) == (5, 2)
        np.testing.assert_allclose(trace.step_values, values, atol=1e-6)
        assert trace.step_values.dtype == np.float32
        correct = leaf in (3, 8)
        assert trace.reward == float(correct)
        assert trace.flags == FLAG_SEARCH | (FLAG_CORRECT if correct else 0)
    assert tree_value_traces(hand_tree, ends_at(16, 17), 5, 2) == []  # t16, t17 were never reached


def test_a_sampled_solution_alone_gives_targets(hand_tree):
    """Only t22 correct, a candidate of node 4 never expanded (node 10). d: 10: 1, 4: 2, 2: 3, 0: 4; 1, 9
    inherit 4; 3, 5, 8 inherit 3; 6, 7 inherit 2. On the path: v2 = 1/3, v4 = 1/3 + (2/3)/2 = 2/3, v10 = 1.
    Off: v1 = v9 = 0; v3 = v5 = 1/3 - (2/3)/3 = 1/9; v8 = max(1/9 - (8/9)/3, 0) = 0; v6 = v7 = 2/3 - (1/3)/2."""
    traces = tree_value_traces(hand_tree, ends_at(22), problem_id=0, iteration=1)
    nan = np.nan
    want = [[1 / 3, 1 / 9], [nan, 2 / 3, 1 / 2], [nan, nan, 1 / 2], [nan, 1 / 9, 0], [0, 0], [nan, nan, 1]]
    assert len(traces) == len(want)
    for trace, values in zip(traces, want, strict=True):
        np.testing.assert_allclose(trace.step_values, values, atol=1e-6)
    assert [t.reward for t in traces] == [0, 0, 0, 0, 0, 1]
    np.testing.assert_array_equal(traces[-1].tokens, [*S.PROMPT, 102, 107, 122])


@pytest.mark.parametrize("finished_only", [True, False])
def test_tree_value_traces_each_target_once(finished_only):
    """A larger search (ReST-MCTS*'s reference rule), where copies below terminal nodes leave gaps in the
    reported node indices: every reported node but the root, and every sampled solution, gets its target in
    exactly one trace, and each correct leaf's is 1. Every node of this tree reaches a finished solution, so
    finished_only leaves none out."""
    (row,) = extract_traces(S.searcher("rest_mcts", 40, **S.REFERENCE_RULE)(S.stack([S.random_table(1)]), KEY, 1.0))
    reported = [int(p.nodes[-1]) for p in row.paths]
    assert reported != list(range(len(reported)))  # sparse indices were exercised
    assert row.sampled_solutions  # and finished candidates never taken
    threshold = np.median([p.terminal_value for p in row.terminals])
    is_correct = lambda p: p.terminal_value is not None and p.terminal_value >= threshold  # noqa: E731
    traces = tree_value_traces(row, is_correct, 0, 0, finished_only=finished_only)
    by_node = {int(p.nodes[-1]): p for p in row.paths}
    given, sampled_given = {}, 0
    for trace in traces:
        leaf = next(p for p in row.paths + row.sampled_solutions if np.array_equal(p.tokens, trace.tokens))
        for node, value in zip(leaf.nodes[1:], trace.step_values, strict=True):
            if node < 0:  # a sampled solution: its own target, always given
                assert not np.isnan(value)
                sampled_given += 1
            elif not np.isnan(value):
                assert int(node) not in given
                given[int(node)] = value
        if trace.flags & FLAG_CORRECT:
            assert by_node[int(leaf.nodes[-1])].terminal[-1] and trace.step_values[-1] == 1.0
    assert sorted(given) == reported[1:] and sampled_given == len(row.sampled_solutions)
    assert sum(t.reward for t in traces) == sum(is_correct(p) for p in row.terminals) > 1


def test_finished_only_leaves_out_nodes_below_which_nothing_finished():
    """A 3-simulation search in which some expanded node has no finished solution at or below it (every finished
    one counts as correct here): with finished_only such a node carries NaN, a leaf with nothing left to learn
    gives no trace, and every other target is the one all_nodes gives it."""
    (row,) = extract_traces(S.searcher("rest_mcts", 3, **S.REFERENCE_RULE)(S.stack([S.random_table(1)]), KEY, 1.0))
    paths = row.paths + row.sampled_solutions
    finished = {int(n) for p in paths if p.terminal[-1] for n in p.nodes[:-1]}  # nodes with a finished descendant
    unfinished = [int(p.nodes[-1]) for p in row.paths if not p.terminal[-1] and int(p.nodes[-1]) not in finished]
    assert unfinished  # the case is exercised

    def targets(finished_only) -> dict[int, float]:
        """{reported node: its target} over the traces (a sampled solution's own step left out)."""
        out = {}
        for trace in tree_value_traces(row, lambda p: True, 0, 0, finished_only=finished_only):
            leaf = next(p for p in paths if np.array_equal(p.tokens, trace.tokens))
            out.update({int(n): v for n, v in zip(leaf.nodes[1:], trace.step_values) if n >= 0 and np.isfinite(v)})
        return out

    every, only = targets(False), targets(True)
    assert set(every) - set(only) == set(unfinished)
    assert only == {n: v for n, v in every.items() if n not in unfinished}
