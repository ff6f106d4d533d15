"""Search correctness on synthetic tables (tests/search/synthetic.py): the rule before the reference's
(unvisited children first by prior, mctx's running mean) on mctx against a pure-Python reference of it, the best
answer found, the terminal and invalid-slot conventions, and batch = separate searches, the last three under
every rule, ReST-MCTS*'s reference rule (`MCTSConfig`'s defaults) included. The reference rule itself is checked
against a transcription of the reference in test_reference_mcts_star.py."""

import math

import jax
import numpy as np
import pytest
import synthetic as S

from jaxreason.search.selection import INVALID_LOGIT
from jaxreason.search.traces import extract_traces

SIMS = 64
KEY = jax.random.key(0)
# name -> (searcher arguments, c, settings) for the rules' runs below; Gumbel without noise so that it is deterministic.
# "rest_mcts" is the old rule (the python reference below); "rest_mcts_reference" ReST-MCTS*'s reference rule.
CONFIGS = {
    "rest_mcts": (("rest_mcts", SIMS), 1.0, S.OLD_RULE),
    "rest_mcts_reference": (("rest_mcts", SIMS), 1.0, S.REFERENCE_RULE),
    "muzero": (("muzero", 2 * SIMS), 1.25, S.OLD_RULE),
    "gumbel": (("gumbel", SIMS, None, 0.0), 1.0, S.OLD_RULE),
}
REST_MCTS = ("rest_mcts", "rest_mcts_reference")


@pytest.fixture(scope="module")
def tables() -> S.Table:
    """Row 0: the hand-made table; rows 1-7: random tables."""
    return S.stack([S.fixed_table()] + [S.random_table(seed) for seed in range(7)])


@pytest.fixture(scope="module")
def trees(tables) -> dict:
    """The host tree of each rule's search over all rows."""
    return {name: jax.device_get(S.searcher(*args, **rule)(tables, KEY, c))
            for name, (args, c, rule) in CONFIGS.items()}


def reference_rest_mcts(table: S.Table, num_simulations: int, c: float) -> dict[str, np.ndarray]:
    """The old rule (unvisited="prior", backup="running_mean") in plain Python on one table, with mctx's
    bookkeeping: node i + 1 is created by simulation i; a node's value is the running mean of its own value and
    every value backed up through it; the backed-up value is reward + discount * (value from below); below a
    terminal node an expansion makes a copy of it."""
    n, k = num_simulations + 1, S.K
    visits = np.zeros(n, int)
    values = np.zeros(n)
    parents = np.full(n, -1)
    children = np.full((n, k), -1)
    child_visits = np.zeros((n, k), int)
    rewards, discounts = np.zeros((n, k)), np.zeros((n, k))
    logits = np.zeros((n, k))
    table_node = np.zeros(n, int)
    terminal = np.zeros(n, bool)
    visits[0], values[0], logits[0] = 1, table.value[0], table.logits[0]

    def select(i: int) -> int:
        valid = logits[i] > INVALID_LOGIT / 2
        unvisited = np.flatnonzero(valid & (child_visits[i] == 0))
        if len(unvisited):
            return max(unvisited, key=lambda a: (logits[i, a], -a))
        if not valid.any():
            return 0

        def uct(a):
            q = rewards[i, a] + discounts[i, a] * values[children[i, a]]
            return q + c * math.sqrt(2 * math.log(visits[i]) / child_visits[i, a])

        return max(np.flatnonzero(valid), key=lambda a: (uct(a), -a))

    for sim in range(num_simulations):
        path, node = [], 0
        while True:
            action = select(node)
            path.append((node, action))
            if children[node, action] < 0:
                break
            node = children[node, action]
        new = sim + 1
        if terminal[node]:
            table_node[new], terminal[new] = table_node[node], True
            reward, discount, logits[new] = table.value[table_node[node]], 0.0, INVALID_LOGIT
        else:
            table_node[new] = S.child_id(table_node[node], action)
            terminal[new] = table.terminal[table_node[new]]
            reward = table.value[table_node[new]] if terminal[new] else 0.0
            discount, logits[new] = float(not terminal[new]), table.logits[table_node[new]]
        children[node, action], parents[new] = new, node
        rewards[node, action], discounts[node, action] = reward, discount
        visits[new], values[new] = 1, table.value[table_node[new]]
        backed_up = values[new]
        for p, a in reversed(path):
            backed_up = rewards[p, a] + discounts[p, a] * backed_up
            values[p] = (values[p] * visits[p] + backed_up) / (visits[p] + 1)
            visits[p] += 1
            child_visits[p, a] += 1
    return dict(
        node_visits=visits, node_values=values, parents=parents, children_index=children, children_visits=child_visits
    )


def table_nodes(tree, b: int) -> np.ndarray:
    """[N] the table node of each tree node of row b (its last step's token names it)."""
    emb = tree.embeddings
    last = emb.tokens[b, np.arange(emb.tokens.shape[1]), emb.length[b] - 1]
    return np.where(emb.depth[b] == 0, 0, last - S.STEP_TOKEN)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_rest_mcts_matches_reference(tables, c):
    tree = jax.device_get(S.searcher("rest_mcts", SIMS, **S.OLD_RULE)(tables, KEY, c))
    for b in range(tables.value.shape[0]):
        ref = reference_rest_mcts(S.row(tables, b), SIMS, c)
        for name in ("children_visits", "node_visits", "parents", "children_index"):
            np.testing.assert_array_equal(getattr(tree, name)[b], ref[name], err_msg=f"row {b}: {name}")
        np.testing.assert_allclose(tree.node_values[b], ref["node_values"], atol=1e-5)


@pytest.mark.parametrize("rule", list(CONFIGS))
def test_finds_the_best_answer_of_the_hand_made_table(trees, rule):
    """The prior leads to a 0.3 answer; the PRM leads to the 0.95 one. Gumbel MuZero's Sequential Halving
    splits the root's visits evenly between the actions it keeps, so its answer is the best path by value."""
    traces = extract_traces(trees[rule])[0]
    answers = [int(p.tokens[-1]) - S.STEP_TOKEN for p in traces.terminals]
    assert S.FIXED_BEST in answers
    best = [traces.best_by_value] if rule == "gumbel" else [traces.best_by_value, traces.best_by_visits]
    for path in best:
        assert int(path.tokens[-1]) - S.STEP_TOKEN == S.FIXED_BEST
        assert path.terminal_value == pytest.approx(S.FIXED[S.FIXED_BEST][0])


@pytest.mark.parametrize("name", REST_MCTS)
def test_rest_mcts_finds_the_best_answer_of_every_table(tables, trees, name):
    for b, traces in enumerate(extract_traces(trees[name])):
        table = S.row(tables, b)
        answers = [n for n in S.reachable(table) if table.terminal[n]]
        found = [int(p.tokens[-1]) - S.STEP_TOKEN for p in traces.terminals]
        assert max(answers, key=lambda n: table.value[n]) in found, f"row {b}"


@pytest.mark.parametrize("rule", list(CONFIGS))
def test_terminal_nodes_are_absorbing(tables, trees, rule):
    """A simulation that reaches a terminal node expands a copy of it below (mctx expands once per simulation):
    the same embedding, the terminal score as reward with discount 0, so every backup through a terminal node
    carries its score, and its value and Q stay equal to it. Nothing else is ever expanded below one."""
    tree = trees[rule]
    emb = tree.embeddings
    copies = 0
    for b in range(tables.value.shape[0]):
        ids = table_nodes(tree, b)
        for n in np.flatnonzero(tree.node_visits[b] > 0):
            p = tree.parents[b, n]
            if not emb.terminal[b, n]:
                assert p < 0 or not emb.terminal[b, p]
                continue
            score = tables.value[b, ids[n]]
            assert emb.terminal_value[b, n] == pytest.approx(score)
            assert tree.node_values[b, n] == pytest.approx(score, abs=1e-6)
            a = tree.action_from_parent[b, n]
            assert tree.children_rewards[b, p, a] == pytest.approx(score)
            assert tree.children_discounts[b, p, a] == 0.0
            if emb.terminal[b, p]:
                copies += 1
                for leaf in jax.tree.leaves(emb):
                    np.testing.assert_array_equal(leaf[b, n], leaf[b, p])
                if rule in REST_MCTS:
                    assert a == 0  # every slot of a terminal node is invalid
    assert copies > 0  # the case was exercised


@pytest.mark.parametrize("rule", list(CONFIGS))
def test_invalid_slots_are_never_selected(tables, trees, rule):
    tree = trees[rule]
    for b in range(tables.value.shape[0]):
        ids = table_nodes(tree, b)
        for n in np.flatnonzero((tree.node_visits[b] > 0) & ~tree.embeddings.terminal[b]):
            invalid = tables.logits[b, ids[n]] <= INVALID_LOGIT / 2
            assert (tree.children_index[b, n, invalid] == -1).all(), f"row {b} node {n}"
            assert (tree.children_visits[b, n, invalid] == 0).all()


@pytest.mark.parametrize("rule", [*REST_MCTS, "gumbel"])
def test_batch_equals_separate_searches(tables, trees, rule):
    """mctx splits the simulation keys by batch size, so only the deterministic rules (ReST-MCTS*, Gumbel
    MuZero without noise, on a table that ignores its key) can match row by row; MuZero's Dirichlet noise
    and tie-break noise depend on the batch size."""
    args, c, settings = CONFIGS[rule]
    batched = jax.tree.leaves(trees[rule])
    for b in range(tables.value.shape[0]):
        single = jax.tree.leaves(jax.device_get(S.searcher(*args, **settings)(S.stack([S.row(tables, b)]), KEY, c)))
        for x, y in zip(batched, single, strict=True):
            np.testing.assert_array_equal(x[b], y[0], err_msg=f"row {b}")
