"""jaxreason's MCTS* against a pure-Python transcription of the reference's (THUDM/ReST-MCTS, MCTS/mcts.py and
MCTS/base.py), not of jaxreason's own rule, on synthetic tables (tests/search/synthetic.py).

The transcription keeps the reference's control flow: `executeRound` selects down fully expanded nodes with
`getBestChild` (UCT, unvisited children at V + INF), expands the selected node (all its children, each valued),
rolls forward greedily from its best child (`greedyPolicy`), sets that child's V to (1 - alpha) V + alpha max V
and its visits to 1, and `back_propagate`s: every node on the way up takes one visit and, when expanded, the
visit-weighted mean of its children's values. A table node's children are its valid slots (the proposals, in
slot order), its value the value model's, and a terminal node is one whose reflection is "<end>".
Run in "full" sample mode (the data-collection mode: no stop at `end_gate`), with roll_branch = K.

jaxreason with `unvisited="value"` and `backup="children_mean"` should give the same tree: the reference's round
1 is mctx's root creation and round i + 1 its simulation i; ties (none in these tables) go to the lowest slot
where the reference picks at random. Compared per table node: visits and value.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np
import pytest
import synthetic as S

from jaxreason.search.node import NO_SLOT, NodeState
from jaxreason.search.selection import INVALID_LOGIT, run_mcts

INF = 1.0  # the reference's default `inf`
C = 0.7  # the reference's default exploration constant
ROUNDS = 24


# ---------------------------------------------------------------- the reference, transcribed


class RefNode:
    """MCTS/base.py's treeNode, with the fields MCTS* uses (pcd: the table node)."""

    def __init__(self, table_node: int, parent=None, depth: int = 0):
        self.table_node, self.parent, self.depth = table_node, parent, depth
        self.numVisits, self.V = 0, 0.0
        self.children: dict[int, RefNode] = {}
        self.isFullyExpanded = False
        self.reflection = ""


class Reference:
    """MCTS/mcts.py's MCTS_search with reward_model_type "vm", roll_policy "greedy", sample_value "full"."""

    def __init__(self, table: S.Table, roll_forward_steps: int, alpha: float):
        self.table, self.roll_forward_steps, self.alpha = table, roll_forward_steps, alpha
        self.root = RefNode(0)

    def proposals(self, table_node: int) -> list[int]:
        return [S.child_id(table_node, k) for k in range(S.K) if self.table.logits[table_node, k] > INVALID_LOGIT / 2]

    def value(self, table_node: int) -> float:
        return float(self.table.value[table_node])

    def reflection(self, table_node: int) -> str:
        return "<end>" if self.table.terminal[table_node] else "<continue>"

    def get_best_child(self, node: RefNode) -> RefNode:
        best_value, best = 0.0, []  # mcts_task.low
        for child in node.children.values():
            if child.numVisits > 0:
                v = child.V + C * math.sqrt(2 * math.log(node.numVisits) / child.numVisits)
            else:
                v = child.V + INF
            if v > best_value:
                best_value, best = v, [child]
            elif v == best_value:
                best.append(child)
        return best[0]  # the reference: random.choice(bestNodes)

    def select_node(self, node: RefNode) -> RefNode:
        while node.isFullyExpanded:
            node = self.get_best_child(node)
        return node  # isTerminal (V >= end_gate) never stops a "full" search

    def expand(self, node: RefNode) -> RefNode:
        if not node.reflection:
            node.reflection = self.reflection(node.table_node)
        if node.reflection == "<end>":
            return node
        for table_node in self.proposals(node.table_node):
            child = RefNode(table_node, node, node.depth + 1)
            child.V = self.value(table_node)
            node.children[table_node] = child
        node.isFullyExpanded = True
        return node

    def greedy_policy(self, node: RefNode) -> float:
        max_v = 0.0
        node.reflection = self.reflection(node.table_node)
        if node.reflection == "<end>":
            return node.V
        current = node.table_node
        for _ in range(self.roll_forward_steps):
            actions = self.proposals(current)
            if not actions:
                break
            values = [self.value(a) for a in actions]
            current, value = actions[int(np.argmax(values))], max(values)
            max_v = max(max_v, value)
            if self.reflection(current) == "<end>":
                break
        return max_v

    def execute_round(self) -> None:
        node = self.select_node(self.root)
        if node.reflection != "<end>":
            node = self.expand(node)
        if node.reflection != "<end>":
            roll_node = self.get_best_child(node)
            best_v = self.greedy_policy(roll_node)
            roll_node.V = roll_node.V * (1 - self.alpha) + best_v * self.alpha
            roll_node.numVisits += 1
        while node is not None:  # back_propagate
            node.numVisits += 1
            if node.isFullyExpanded:
                visits = sum(c.numVisits for c in node.children.values())
                if visits > 0:
                    node.V = sum(c.V * c.numVisits for c in node.children.values()) / visits
            node = node.parent

    def nodes(self) -> dict[int, tuple[int, float]]:
        """{table node: (visits, V)} of every node visited at least once."""
        out, stack = {}, [self.root]
        while stack:
            node = stack.pop()
            if node.numVisits:
                out[node.table_node] = (node.numVisits, node.V)
            stack += node.children.values()
        return out


# ---------------------------------------------------------------- jaxreason's side: the table as a search


def _rolled(tables: S.Table, child, roll_steps: int, alpha: float):
    """[B] the rolled value of table node `child` (the reference's greedyPolicy from it and its V update)."""
    rows = jnp.arange(child.shape[0])
    start = tables.value[rows, child]

    def step(_, carry):
        node, done, most = carry
        children = S.child_id(node[:, None], jnp.arange(S.K))
        valid = tables.logits[rows, node] > INVALID_LOGIT / 2
        values = jnp.where(valid, tables.value[rows[:, None], jnp.where(valid, children, 0)], -jnp.inf)
        pick = jnp.argmax(values, axis=1)
        moves = ~done & valid.any(axis=1)
        most = jnp.where(moves, jnp.maximum(most, values[rows, pick]), most)
        node = jnp.where(moves, children[rows, pick], node)
        return node, done | ~moves | tables.terminal[rows, node], most

    done = tables.terminal[rows, child]
    _, _, most = jax.lax.fori_loop(0, roll_steps, step, (child, done, jnp.zeros_like(start)))
    return jnp.where(done, start, (1 - alpha) * start + alpha * most)


def _state(tables: S.Table, node, tokens, length, depth, step_ends, roll_steps: int, alpha: float):
    """The NodeState of table node `node` [B], its best child visited and rolled forward as a new node's is."""
    rows = jnp.arange(node.shape[0])
    children = S.child_id(node[:, None], jnp.arange(S.K))
    valid = tables.logits[rows, node] > INVALID_LOGIT / 2
    safe = jnp.where(valid, children, 0)
    terminal = tables.terminal[rows, node]
    values = jnp.where(valid, tables.value[rows[:, None], safe], 0.0)
    best = jnp.argmax(jnp.where(valid, values, -jnp.inf), axis=1).astype(jnp.int32)
    has_best = valid.any(axis=1) & ~terminal
    rolled = _rolled(tables, jnp.minimum(children[rows, best], S.NUM_TABLE_NODES - 1), roll_steps, alpha)
    return NodeState(
        tokens=tokens, length=length, prompt_len=jnp.full_like(length, len(S.PROMPT)), step_ends=step_ends,
        depth=depth, node_type=jnp.zeros_like(length), terminal=terminal, score=tables.value[rows, node],
        terminal_value=jnp.where(terminal, tables.value[rows, node], 0.0),
        candidates=jnp.where(valid, S.STEP_TOKEN + safe, S.PAD)[:, :, None], candidate_len=valid.astype(jnp.int32),
        candidate_ends=valid & tables.terminal[rows[:, None], safe], candidate_values=values,
        rolled_slot=jnp.where(has_best, best, NO_SLOT), rolled_value=jnp.where(has_best, rolled, 0.0),
        generated_tokens=valid.sum(-1).astype(jnp.int32), verifier_tokens=jnp.zeros_like(length),
    )


def _value(state: NodeState):
    """The value a new node backs up: its rolled best child's, or its score where it has none (terminal)."""
    return jnp.where(state.rolled_slot != NO_SLOT, state.rolled_value, state.score)


@functools.cache
def _searcher(num_simulations: int, roll_steps: int, alpha: float):
    @jax.jit
    def search(tables: S.Table):
        batch = tables.value.shape[0]
        tokens = jnp.zeros((batch, len(S.PROMPT) + num_simulations + 1), jnp.int32)
        tokens = tokens.at[:, : len(S.PROMPT)].set(jnp.array(S.PROMPT))
        zeros = jnp.zeros(batch, jnp.int32)
        root = _state(tables, zeros, tokens, jnp.full(batch, len(S.PROMPT)), zeros,
                      jnp.zeros((batch, S.DEPTH), jnp.int32), roll_steps, alpha)
        prior = jnp.where(root.terminal[:, None], INVALID_LOGIT, tables.logits[:, 0])

        def recurrent_fn(params, rng_key, action, parent: NodeState):
            del params, rng_key
            rows = jnp.arange(action.shape[0])
            node = jnp.minimum(S.child_id(S.current_node(parent), action), S.NUM_TABLE_NODES - 1)
            length = parent.length + 1
            child = _state(tables, node, parent.tokens.at[rows, parent.length].set(
                parent.candidates[rows, action, 0], mode="drop"), length, parent.depth + 1,
                parent.step_ends.at[rows, parent.depth].set(length, mode="drop"), roll_steps, alpha)
            stay = parent.terminal  # below a terminal node: the same node again
            child = jax.tree.map(lambda p, c: jnp.where(stay.reshape(stay.shape + (1,) * (p.ndim - 1)), p, c),
                                 parent, child)
            value = jnp.where(child.terminal, child.terminal_value, _value(child))
            out = mctx.RecurrentFnOutput(
                reward=jnp.where(child.terminal, value, 0.0), discount=jnp.where(child.terminal, 0.0, 1.0),
                prior_logits=jnp.where(child.terminal[:, None], INVALID_LOGIT, tables.logits[rows, node]),
                value=value)
            return out, child

        return run_mcts(None, jax.random.key(0), mctx.RootFnOutput(prior_logits=prior, value=_value(root),
                                                                     embedding=root),
                        recurrent_fn, rule="rest_mcts", num_simulations=num_simulations, max_depth=None, c=C,
                        unvisited="value", unvisited_bonus=INF, backup="children_mean")

    return search


def _ours(tree: mctx.Tree, b: int) -> dict[int, tuple[int, float]]:
    """{table node: (visits, value)} of row b, the visit a node's creation paid its best child included, and a
    best child visited only so (not yet a node) listed with that visit and its rolled value."""
    emb: NodeState = tree.embeddings
    terminal = emb.terminal[b]
    parents = tree.parents[b]
    out = {}
    for n in np.flatnonzero(tree.node_visits[b] > 0):
        p = parents[n]
        if p >= 0 and terminal[p]:
            continue  # a copy below a terminal node, not a node of its own
        node = int(S.current_node(jax.tree.map(lambda x: x[b:b + 1, n], emb))[0])
        rolled = p >= 0 and tree.action_from_parent[b, n] == emb.rolled_slot[b, p]
        out[node] = (int(tree.node_visits[b, n] + rolled), float(tree.node_values[b, n]))
        slot = emb.rolled_slot[b, n]
        if slot != NO_SLOT and tree.children_index[b, n, slot] < 0:
            out[S.child_id(node, int(slot))] = (1, float(emb.rolled_value[b, n]))
    return out


@pytest.fixture(scope="module")
def tables() -> S.Table:
    return S.stack([S.fixed_table()] + [S.random_table(seed) for seed in range(7)])


@pytest.mark.parametrize("roll_steps, alpha", [(0, 0.0), (2, 0.5), (3, 0.3)])
def test_search_matches_the_reference_transcription(tables, roll_steps, alpha):
    tree = jax.device_get(_searcher(ROUNDS - 1, roll_steps, alpha)(tables))
    for b in range(tables.value.shape[0]):
        # roll_forward_steps 0 in the reference still scales the value by 1 - alpha (its max starts at 0); with
        # alpha 0 that is the identity, which is what jaxreason's rollout_steps 0 means.
        ref = Reference(S.row(tables, b), roll_steps, alpha)
        for _ in range(ROUNDS):
            ref.execute_round()
        want, got = ref.nodes(), _ours(tree, b)
        assert set(got) == set(want), f"table {b}: nodes {sorted(got)} != reference {sorted(want)}"
        for node, (visits, value) in want.items():
            assert got[node][0] == visits, f"table {b} node {node}: {got[node][0]} visits, reference {visits}"
            np.testing.assert_allclose(got[node][1], value, atol=1e-5, err_msg=f"table {b} node {node}")


def test_a_good_visited_child_beats_a_poor_unvisited_one():
    """What makes the reference differ from taking every unvisited child first: V + INF is finite, so a visited
    child with a high value can win over a sibling whose value is low. The root's children are worth 0.9, 0.5 and
    0.2 (each with one terminal child of the same value): after three rounds the 0.2 child is still unvisited,
    where an unvisited-first rule would have taken it in round 3."""
    table = S._empty_table()
    for slot, value in enumerate((0.9, 0.5, 0.2)):
        child = S.child_id(0, slot)
        table.logits[0, slot] = 0.0
        table.value[child] = value
        table.logits[child, 0] = 0.0
        table.value[S.child_id(child, 0)], table.terminal[S.child_id(child, 0)] = value, True
    ref = Reference(table, 0, 0.0)
    for _ in range(3):
        ref.execute_round()
    got = _ours(jax.device_get(_searcher(2, 0, 0.0)(S.stack([table]))), 0)
    assert got.keys() == ref.nodes().keys()
    assert S.child_id(0, 2) not in got
    assert got[0] == (3, pytest.approx(ref.nodes()[0][1]))


def test_children_mean_is_the_visit_weighted_mean(tables):
    tree = jax.device_get(_searcher(ROUNDS - 1, 2, 0.5)(tables))
    emb: NodeState = tree.embeddings
    for b in range(tables.value.shape[0]):
        for n in np.flatnonzero(tree.node_visits[b] > 0):
            if emb.terminal[b, n]:
                continue
            counts = tree.children_visits[b, n].astype(float)
            q = tree.children_rewards[b, n] + tree.children_discounts[b, n] * tree.children_values[b, n]
            slot = emb.rolled_slot[b, n]
            if slot != NO_SLOT:
                if counts[slot] == 0:
                    q[slot] = emb.rolled_value[b, n]
                counts[slot] += 1
            chex.assert_trees_all_close(tree.node_values[b, n], (counts * q).sum() / counts.sum(), atol=1e-6)
