"""A search environment in which the language model and the PRM are a fixed table.

A table is a complete K-ary tree of depth DEPTH in heap order: the child in slot k of table node i is table
node K * i + 1 + k. Per table node it gives the K prior logits (`INVALID_LOGIT` for a slot that may not be
taken), a value and a terminal flag; a terminal node's value is its score, and it has no valid slot. Every
table node at depth DEPTH is terminal, so a solution has at most DEPTH steps.

Each step is one token, STEP_TOKEN + table node id, so a node's tokens spell its path through the table. The
recurrent function follows the search conventions exactly: a new terminal node gets reward = its score and
discount 0, any other node reward 0 and discount 1; below a terminal node expansion is a no-op (the same
embedding, reward = terminal_value, discount 0, every slot invalid). A terminal node's value (thrown away by
mctx, since the discount is 0) is its score too, so its search value stays equal to its score.

With `visit_best_child` (the real search's setting under `backup="children_mean"`), creating a non-terminal
node also visits its best child by value, as ReST-MCTS*'s expansion does: `rolled_slot` names it, `rolled_value`
is its value (no roll-forward here) and the node backs up that value instead of its own. Without it,
`rolled_slot` is `NO_SLOT` and the node backs up its own value: the search before the reference's rule.

Batch row b searches table b, given through `params`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np

from jaxreason.search.node import NO_SLOT, NodeState
from jaxreason.search.selection import INVALID_LOGIT, run_mcts

K = 3
DEPTH = 3
NUM_TABLE_NODES = (K ** (DEPTH + 1) - 1) // (K - 1)
PROMPT = (1, 7)
STEP_TOKEN = 100
PAD = 0
OLD_RULE = {"unvisited": "prior", "backup": "running_mean"}
"""The rule before ReST-MCTS*'s reference behaviour: unvisited children first by prior, mctx's running mean."""
REFERENCE_RULE = {"unvisited": "value", "backup": "children_mean"}
"""ReST-MCTS*'s reference behaviour (`MCTSConfig`'s defaults)."""


@chex.dataclass(frozen=True)
class Table:
    """A batch of tables (numpy or jax arrays), T = NUM_TABLE_NODES.

    logits: [B, T, K] prior logit of each slot, INVALID_LOGIT where invalid.
    value: [B, T] PRM value of a non-terminal node, score of a terminal one; all in [0, 1].
    terminal: [B, T] the node ends the solution.
    """

    logits: np.ndarray
    value: np.ndarray
    terminal: np.ndarray


def child_id(node, slot):
    return K * node + 1 + slot


# The hand-made table: node -> (value, terminal, {slot: logit}); unlisted slots are invalid, unlisted nodes
# unreachable. The prior prefers 0 -> 1 -> 4 (score 0.3); the best answer is 0 -> 2 -> 7 -> 22 (score 0.95),
# whose last step has the lowest prior of its siblings.
FIXED = {
    0: (0.5, False, {0: 1.0, 1: 0.0}),
    1: (0.4, False, {0: 0.5, 1: 0.2}),
    2: (0.7, False, {0: 0.1, 1: 0.3, 2: 0.0}),
    4: (0.3, True, {}),
    5: (0.45, False, {0: 0.0, 1: 0.1}),
    7: (0.8, False, {0: -0.5, 1: 0.5, 2: 0.0}),
    8: (0.2, True, {}),
    9: (0.6, False, {0: 0.0}),
    16: (0.4, True, {}),
    17: (0.5, True, {}),
    22: (0.95, True, {}),
    23: (0.6, True, {}),
    24: (0.1, True, {}),
    28: (0.7, True, {}),
}
FIXED_BEST = 22


def _empty_table() -> Table:
    return Table(
        logits=np.full((NUM_TABLE_NODES, K), INVALID_LOGIT, np.float32),
        value=np.zeros(NUM_TABLE_NODES, np.float32),
        terminal=np.zeros(NUM_TABLE_NODES, bool),
    )


def fixed_table() -> Table:
    table = _empty_table()
    for node, (value, terminal, slots) in FIXED.items():
        table.value[node], table.terminal[node] = value, terminal
        for slot, logit in slots.items():
            table.logits[node, slot] = logit
    return table


def random_table(seed: int, prm_noise: float = 0.05) -> Table:
    """A random table: below depth 1 a node is terminal with probability 0.3; each slot of a non-terminal node
    is invalid with probability 0.3 (at least one stays valid); logits are N(0, 1), scores U(0, 1). The PRM is
    informative but noisy: a non-terminal node's value is the best score below it plus N(0, prm_noise)."""
    rng = np.random.default_rng(seed)
    table = _empty_table()

    def grow(node: int, depth: int) -> float:
        """Fills the subtree of `node`; returns the best score in it."""
        table.terminal[node] = depth == DEPTH or (depth >= 1 and rng.uniform() < 0.3)
        if table.terminal[node]:
            table.value[node] = rng.uniform()
            return table.value[node]
        valid = rng.uniform(size=K) >= 0.3
        valid[rng.integers(K)] = True
        table.logits[node] = np.where(valid, rng.normal(size=K), INVALID_LOGIT)
        best = max(grow(child_id(node, k), depth + 1) for k in range(K) if valid[k])
        table.value[node] = np.clip(best + prm_noise * rng.normal(), 0.0, 1.0)
        return best

    grow(0, 0)
    return table


def stack(tables: list[Table]) -> Table:
    return jax.tree.map(lambda *xs: np.stack(xs), *tables)


def row(tables: Table, b: int) -> Table:
    return jax.tree.map(lambda x: x[b], tables)


def reachable(table: Table) -> list[int]:
    """Table nodes reachable from the root through valid slots (one table, no batch axis)."""
    nodes, frontier = [], [0]
    while frontier:
        node = frontier.pop()
        nodes.append(node)
        frontier += [child_id(node, k) for k in range(K) if table.logits[node, k] > INVALID_LOGIT / 2]
    return sorted(nodes)


def _node_state(tables: Table, node, tokens, length, depth, step_ends, visit_best_child: bool):
    """The NodeState of table node `node` [B] with the given path so far, and the value it backs up [B]."""
    rows = jnp.arange(node.shape[0])
    children = child_id(node[:, None], jnp.arange(K))  # [B, K]
    valid = tables.logits[rows, node] > INVALID_LOGIT / 2
    safe_children = jnp.where(valid, children, 0)
    terminal = tables.terminal[rows, node]
    score = tables.value[rows, node]
    values = jnp.where(valid, tables.value[rows[:, None], safe_children], 0.0)
    best = jnp.argmax(jnp.where(valid, values, -jnp.inf), axis=1).astype(jnp.int32)
    visits_best = jnp.any(valid, axis=1) & ~terminal & visit_best_child
    state = NodeState(
        tokens=tokens,
        length=length,
        prompt_len=jnp.full_like(length, len(PROMPT)),
        step_ends=step_ends,
        depth=depth,
        node_type=jnp.zeros_like(length),
        terminal=terminal,
        score=score,
        terminal_value=jnp.where(terminal, score, 0.0),
        candidates=jnp.where(valid, STEP_TOKEN + safe_children, PAD)[:, :, None],
        candidate_len=valid.astype(jnp.int32),
        candidate_ends=valid & tables.terminal[rows[:, None], safe_children],
        candidate_values=values,
        rolled_slot=jnp.where(visits_best, best, NO_SLOT),
        rolled_value=jnp.where(visits_best, values[rows, best], 0.0),
        generated_tokens=valid.sum(-1).astype(jnp.int32),
        verifier_tokens=jnp.zeros_like(length),
    )
    return state, jnp.where(visits_best, values[rows, best], score)


def root_fn(tables: Table, visit_best_child: bool = False) -> mctx.RootFnOutput:
    batch = tables.value.shape[0]
    tokens = jnp.zeros((batch, len(PROMPT) + DEPTH), jnp.int32).at[:, : len(PROMPT)].set(jnp.array(PROMPT))
    zeros = jnp.zeros(batch, jnp.int32)
    length = jnp.full(batch, len(PROMPT), jnp.int32)
    state, value = _node_state(tables, zeros, tokens, length, zeros, jnp.zeros((batch, DEPTH), jnp.int32),
                               visit_best_child)
    return mctx.RootFnOutput(prior_logits=tables.logits[:, 0], value=value, embedding=state)


def current_node(state: NodeState):
    """[B] the table node a NodeState stands for: its last step's token names it."""
    last = state.tokens[jnp.arange(state.length.shape[0]), state.length - 1]
    return jnp.where(state.depth == 0, 0, last - STEP_TOKEN)


def _per_row(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def recurrent_fn(tables: Table, rng_key, action, parent: NodeState, visit_best_child: bool = False):
    del rng_key  # a table has no randomness
    rows = jnp.arange(action.shape[0])
    # Below a terminal node the id runs off the table: clipped, and the result is discarded there.
    node = jnp.minimum(child_id(current_node(parent), action), NUM_TABLE_NODES - 1)
    length = parent.length + 1
    child, value = _node_state(
        tables,
        node,
        parent.tokens.at[rows, parent.length].set(parent.candidates[rows, action, 0], mode="drop"),
        length,
        parent.depth + 1,
        parent.step_ends.at[rows, parent.depth].set(length, mode="drop"),
        visit_best_child,
    )
    state = jax.tree.map(lambda p, c: jnp.where(_per_row(parent.terminal, p), p, c), parent, child)
    ended = state.terminal  # a new terminal node, or the same terminal node again
    output = mctx.RecurrentFnOutput(
        reward=jnp.where(ended, state.terminal_value, 0.0),
        discount=jnp.where(ended, 0.0, 1.0),
        prior_logits=jnp.where(ended[:, None], INVALID_LOGIT, tables.logits[rows, node]),
        value=jnp.where(ended, state.terminal_value, value),
    )
    return output, state


@functools.cache
def searcher(rule: str, num_simulations: int, max_depth: int | None = None, gumbel_scale: float = 1.0, *,
             unvisited: str, backup: str):
    """A jitted search `(tables, rng_key, c) -> mctx.Tree`, one per configuration (jit caches the shapes).

    `unvisited` and `backup` as `MCTSConfig`'s (`OLD_RULE`, `REFERENCE_RULE`); as in the real search, a new node
    visits its best child exactly when the backup is "children_mean".
    """
    visit_best_child = backup == "children_mean"

    @jax.jit
    def search(tables: Table, rng_key, c):
        return run_mcts(
            tables,
            rng_key,
            root_fn(tables, visit_best_child),
            functools.partial(recurrent_fn, visit_best_child=visit_best_child),
            rule=rule,
            num_simulations=num_simulations,
            max_depth=max_depth,
            c=c,
            unvisited=unvisited,
            backup=backup,
            gumbel_scale=gumbel_scale,
        )

    return search
