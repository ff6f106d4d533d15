"""Trace extraction: a hand-checked tree of the old rule on the hand-made table, and consistency with the tables
on a batch and on trees cut by max_depth, under the old rule and ReST-MCTS*'s reference rule."""

import jax
import numpy as np
import pytest
import synthetic as S
from tiny import EOS, TOKENIZER

from jaxreason.search.traces import SearchPath, extract_traces
from jaxreason.tasks import get_task

KEY = jax.random.key(0)


class StepNames:
    """A tokenizer stand-in: step token STEP_TOKEN + i decodes to "s<i>"."""

    def decode(self, token_ids, skip_special_tokens=False):
        return " ".join(f"s{t - S.STEP_TOKEN}" for t in token_ids)


def table_path(actions) -> list[int]:
    """Table nodes after each step when taking `actions` from the table's root."""
    nodes = [0]
    for a in actions:
        nodes.append(S.child_id(nodes[-1], int(a)))
    return nodes[1:]


@pytest.fixture(scope="module")
def hand_tree():
    """9 greedy (c = 0) simulations of the old rule (unvisited children first by prior, running-mean backup) on
    the hand-made table. Worked by hand:
    sims 0-1 expand both root slots (t1 0.4, t2 0.7 by prior order); greedy Q then stays in t2: its slots by
    prior t8 (terminal 0.2), t7 (0.8), t9 (0.6); then t7's slots t23 (0.6), t24 (0.1) by prior; t9's one slot
    t28 (terminal 0.7); the last simulation reaches terminal t28 and expands its copy, node 9."""
    return S.searcher("rest_mcts", 9, **S.OLD_RULE)(S.stack([S.fixed_table()]), KEY, 0.0)


def test_hand_checked_tree(hand_tree):
    traces = extract_traces(hand_tree, tokenizer=StepNames())
    (row,) = traces
    tree = jax.device_get(hand_tree)
    assert tree.parents[0, 9] == 8 and tree.embeddings.terminal[0, 8]  # node 9: the copy, not reported
    expected_nodes = [[0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 4], [0, 2, 5], [0, 2, 4, 6], [0, 2, 4, 7], [0, 2, 5, 8]]
    expected_actions = [[], [0], [1], [1, 1], [1, 0], [1, 2], [1, 0, 1], [1, 0, 2], [1, 2, 0]]
    assert [p.nodes.tolist() for p in row.paths] == expected_nodes
    assert [p.actions.tolist() for p in row.paths] == expected_actions
    # Visits and values of nodes 0..8: running means of each node's own value and the values backed up.
    visits = [10, 1, 8, 1, 3, 3, 1, 1, 2]
    values = [0.53, 0.4, 0.55, 0.2, 0.5, 2 / 3, 0.6, 0.1, 0.7]
    for p in row.paths:
        np.testing.assert_array_equal(p.visits, [visits[n] for n in p.nodes])
        np.testing.assert_allclose(p.values, [values[n] for n in p.nodes], atol=1e-6)

    answer = row.paths[8]
    np.testing.assert_array_equal(answer.tokens, [*S.PROMPT, 102, 109, 128])
    np.testing.assert_array_equal(answer.step_ends, [3, 4, 5])
    assert answer.prompt_len == 2 and answer.text == "s2 s9 s28"
    np.testing.assert_array_equal(answer.node_tokens(1), [*S.PROMPT, 102])
    assert [s.tolist() for s in answer.step_tokens()] == [[102], [109], [128]]
    np.testing.assert_allclose(answer.qvalues, [0.55, 2 / 3, 0.7], atol=1e-6)  # the last edge: its reward
    np.testing.assert_array_equal(answer.terminal, [False, False, False, True])

    assert [p.nodes[-1] for p in row.terminals] == [3, 6, 7, 8]
    assert [p.text for p in row.terminals] == ["s2 s8", "s2 s7 s23", "s2 s7 s24", "s2 s9 s28"]
    np.testing.assert_allclose([p.terminal_value for p in row.terminals], [0.2, 0.6, 0.1, 0.7], atol=1e-6)
    assert all(p.terminal_value is None for p in row.paths if not p.terminal[-1])
    # By visits: root 1 of [1, 8]; in t2 slots 0 and 2 tie at 3 visits (lowest wins), in t7 slots 1 and 2 at 1.
    assert row.best_by_visits.nodes.tolist() == [0, 2, 4, 6]
    # By Q: root [0.4, 0.55] -> t2 [0.5, 0.2, 0.667] -> t9 -> t28, terminal: stop.
    assert row.best_by_value.nodes.tolist() == [0, 2, 5, 8]
    assert row.best_by_value.text == "s2 s9 s28"

    # Finished candidates never taken: t1's slot 0 (t4) and t7's slot 0 (t22, the table's best answer).
    t4, t22 = row.sampled_solutions
    assert t4.nodes.tolist() == [0, 1, -1] and t4.actions.tolist() == [0, 0] and t4.text == "s1 s4"
    assert t22.nodes.tolist() == [0, 2, 4, -1] and t22.actions.tolist() == [1, 0, 0] and t22.text == "s2 s7 s22"
    np.testing.assert_array_equal(t22.tokens, [*S.PROMPT, 102, 107, 122])
    np.testing.assert_array_equal(t22.step_ends, [3, 4, 5])
    np.testing.assert_array_equal(t22.terminal, [False, False, False, True])
    np.testing.assert_array_equal(t22.visits, [10, 8, 3, 0])
    assert np.isnan(t22.values[-1]) and np.isnan(t22.qvalues[-1]) and t22.terminal_value is None


def test_decode_fills_text_without_changing_paths(hand_tree):
    (plain,) = extract_traces(hand_tree)
    assert all(p.text is None for p in plain.paths)
    decoded = plain.decode(StepNames())
    assert [p.text for p in decoded.paths][:3] == ["", "s1", "s2"]
    for a, b in zip(plain.paths, decoded.paths, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def check_consistent(tables: S.Table, tree, traces, max_depth: int = S.DEPTH):
    """Every reported path spells its table path, once per table node; edges carry the tree's Q; the best
    paths end at leaves; the terminals are exactly the terminal paths, with the table's scores."""
    tree = jax.device_get(tree)
    emb = tree.embeddings
    q = tree.children_rewards + tree.children_discounts * tree.children_values
    for b, row in enumerate(traces):
        table = S.row(tables, b)
        below_terminal = (tree.parents[b] >= 0) & emb.terminal[b, np.maximum(tree.parents[b], 0)]
        reported = np.flatnonzero((tree.node_visits[b] > 0) & ~below_terminal)
        assert [int(p.nodes[-1]) for p in row.paths] == reported.tolist()
        ends = []
        for p in row.paths:
            ids = table_path(p.actions)
            ends.append(ids[-1] if ids else 0)
            assert p.depth <= max_depth
            np.testing.assert_array_equal(p.tokens, [*S.PROMPT, *(S.STEP_TOKEN + np.array(ids, int))])
            np.testing.assert_array_equal(p.step_ends, len(S.PROMPT) + 1 + np.arange(p.depth))
            np.testing.assert_array_equal(p.terminal, [False, *table.terminal[ids]])
            np.testing.assert_allclose(p.qvalues, q[b, p.nodes[:-1], p.actions])
            np.testing.assert_array_equal(p.visits, tree.node_visits[b, p.nodes])
        assert len(set(ends)) == len(ends), f"row {b}: a table node reported twice"
        for best in (row.best_by_visits, row.best_by_value):
            assert best.terminal[-1] or (tree.children_index[b, best.nodes[-1]] == -1).all()
        assert [p.nodes[-1] for p in row.terminals] == [p.nodes[-1] for p in row.paths if p.terminal[-1]]
        for p in row.terminals:
            assert p.terminal_value == pytest.approx(table.value[table_path(p.actions)[-1]])
        # Sampled solutions: exactly the terminal table children of reported non-terminal nodes never taken.
        by_node = {int(p.nodes[-1]): p for p in row.paths}
        want = [(int(p.nodes[-1]), k) for p, end in zip(row.paths, ends) if not p.terminal[-1] for k in range(S.K)
                if table.logits[end, k] > S.INVALID_LOGIT / 2 and table.terminal[S.child_id(end, k)]
                and tree.children_index[b, p.nodes[-1], k] < 0]
        assert [(int(p.nodes[-2]), int(p.actions[-1])) for p in row.sampled_solutions] == want
        for p in row.sampled_solutions:
            parent = by_node[int(p.nodes[-2])]
            np.testing.assert_array_equal(p.tokens, [*parent.tokens, S.STEP_TOKEN + table_path(p.actions)[-1]])
            assert p.terminal[-1] and p.terminal_value is None


@pytest.fixture(scope="module")
def tables():
    return S.stack([S.fixed_table()] + [S.random_table(seed) for seed in range(7)])


RULES = {"old": S.OLD_RULE, "reference": S.REFERENCE_RULE}


@pytest.mark.parametrize("rule", list(RULES))
def test_traces_of_a_batch(tables, rule):
    tree = S.searcher("rest_mcts", 64, **RULES[rule])(tables, KEY, 1.0)
    check_consistent(tables, tree, extract_traces(tree))


@pytest.mark.parametrize("rule", list(RULES))
def test_traces_with_max_depth_cut(tables, rule):
    """With max_depth = 2 a simulation that reaches a depth-2 node expands it again in place (mctx overwrites
    it and adds a visit): it is still reported once, as a leaf."""
    tree = S.searcher("rest_mcts", 24, 2, **RULES[rule])(tables, KEY, 1.0)
    host = jax.device_get(tree)
    re_expanded = (host.node_visits > 1 + host.children_visits.sum(-1)) & (host.embeddings.depth == 2)
    assert re_expanded.any()  # the case was exercised (copies below terminal nodes have depth <= 1 here)
    check_consistent(tables, tree, extract_traces(tree), max_depth=2)


def test_a_finished_paths_text_leaves_out_the_eos_so_strict_checks_pass():
    """A finished step ends on EOS: its text must not carry it, or Countdown's whole-text check (like code run in
    the sandbox) fails every solution the search finds."""
    task = get_task("countdown", min_numbers=3, max_numbers=3, max_number=9)
    problem = task.problems("test", n=1)[0]
    solution = task.format_solution(problem.solution_steps, problem.answer)
    prompt = TOKENIZER.encode(task.prompt(problem), add_special_tokens=False)
    tokens = np.array(prompt + TOKENIZER.encode(solution, add_special_tokens=False) + [EOS])
    path = SearchPath(nodes=np.arange(2), actions=np.zeros(1, int), values=np.zeros(2), scores=np.zeros(2),
                      visits=np.ones(2, int), qvalues=np.zeros(1), terminal=np.array([False, True]), tokens=tokens,
                      prompt_len=len(prompt), step_ends=np.array([len(tokens)]), terminal_value=1.0)
    text = path.decode(TOKENIZER).text
    assert text == solution and task.is_correct(problem, text)
