"""ReST-MCTS*'s selection rule on hand-made one-node trees: raw-Q UCT; unvisited children first by prior
(unvisited="prior") or at their verifier value plus a bonus (unvisited="value", the reference's V + INF); the
visit a node's creation paid its best child; invalid slots never; the root mask; all-invalid falls back to
action 0. And `run_mcts`'s argument checks."""

import math

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np
import pytest

from jaxreason.search.node import NO_SLOT
from jaxreason.search.selection import (
    INVALID_LOGIT,
    rest_mcts_interior_selection,
    rest_mcts_root_selection,
    root_invalid_actions,
    run_mcts,
)

KEY = jax.random.key(0)  # the rule is deterministic: any key


@chex.dataclass(frozen=True)
class Embeddings:
    """The `NodeState` fields the rule reads: [N] rolled_slot and rolled_value, [N, K] candidate_values."""

    rolled_slot: chex.Array
    rolled_value: chex.Array
    candidate_values: chex.Array


def one_node_tree(logits, visits=None, qvalues=None, root_invalid=None, values=None, rolled_slot=NO_SLOT,
                  rolled_value=0.0) -> mctx.Tree:
    """An unbatched tree whose node 0 has children with these prior logits, visit counts and Q-values, verifier
    values (`candidate_values`) and the child its creation visited (`rolled_slot`, at `rolled_value`)."""
    logits = jnp.asarray(logits, jnp.float32)[None]
    k = logits.shape[-1]
    visits = jnp.zeros((1, k), jnp.int32) if visits is None else jnp.asarray(visits, jnp.int32)[None]
    qvalues = jnp.zeros((1, k)) if qvalues is None else jnp.asarray(qvalues, jnp.float32)[None]
    values = jnp.zeros((1, k)) if values is None else jnp.asarray(values, jnp.float32)[None]
    embeddings = Embeddings(rolled_slot=jnp.full(1, rolled_slot, jnp.int32),
                            rolled_value=jnp.full(1, rolled_value, jnp.float32), candidate_values=values)
    return mctx.Tree(
        node_visits=1 + visits.sum(-1),
        raw_values=jnp.zeros(1),
        node_values=jnp.zeros(1),
        parents=jnp.full(1, -1),
        action_from_parent=jnp.full(1, -1),
        children_index=jnp.where(visits > 0, 1, -1),
        children_prior_logits=logits,
        children_visits=visits,
        children_rewards=jnp.zeros((1, k)),
        children_discounts=jnp.ones((1, k)),
        children_values=qvalues,  # reward 0, discount 1: Q is the child's value
        embeddings=embeddings,
        root_invalid_actions=jnp.zeros(k) if root_invalid is None else jnp.asarray(root_invalid, jnp.float32),
        extra_data=None,
    )


def select(tree, c=1.0, root=False, unvisited="prior", bonus=1.0) -> int:
    options = dict(c=c, unvisited=unvisited, unvisited_bonus=bonus)
    if root:
        return int(rest_mcts_root_selection(KEY, tree, 0, **options))
    return int(rest_mcts_interior_selection(KEY, tree, 0, 1, **options))


def test_unvisited_first_by_prior_ties_to_lowest_index():
    # Slot 0 is visited with the best possible Q; the unvisited slots still come first.
    tree = one_node_tree([0.1, 2.0, 0.5, 2.0], visits=[3, 0, 0, 0], qvalues=[1.0, 0, 0, 0])
    assert select(tree) == 1
    assert select(tree, root=True) == 1


def test_unvisited_at_value_plus_bonus():
    """unvisited="value": an unvisited child scores its verifier value + bonus, whatever its prior; a visited
    child whose UCT beats that wins over it. Ties go to the lowest index."""
    c = 0.1
    visited_uct = 0.9 + c * math.sqrt(2 * math.log(5) / 4)  # the node has 5 visits, slot 0 4 of them
    assert 0.5 + 0.3 < visited_uct < 0.5 + 1.0
    tree = one_node_tree([0.0, 5.0, 0.0], visits=[4, 0, 0], qvalues=[0.9, 0, 0], values=[0.0, 0.2, 0.5])
    for root in (False, True):
        assert select(tree, c=c, root=root, unvisited="value", bonus=1.0) == 2  # 1.5 > 1.2 > 0.99
        assert select(tree, c=c, root=root, unvisited="value", bonus=0.3) == 0  # 0.99 > 0.8 > 0.5
        assert select(tree, c=c, root=root, unvisited="prior") == 1
    tied = one_node_tree([0.0, 5.0, 0.0], values=[0.5, 0.5, 0.5])
    assert select(tied, unvisited="value") == 0


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0])
def test_the_best_child_visited_at_creation_counts_as_visited(c):
    """`rolled_slot` names the child the node's creation visited: it counts one visit, at `rolled_value` (not its
    verifier value), so it is no longer unvisited under either rule."""
    visits, q = np.array([2, 0, 0]), np.array([0.8, 0.0, 0.0])
    tree = one_node_tree([0.0, 5.0, 1.0], visits=visits, qvalues=q, values=[0.0, 0.0, 0.0], rolled_slot=1,
                         rolled_value=0.9)
    assert select(tree, c=c, unvisited="prior") == 2  # the only unvisited child left
    assert select(one_node_tree([0.0, 5.0, 1.0], visits=visits, qvalues=q), c=c, unvisited="prior") == 1
    n_parent = 1 + visits.sum()
    uct = np.array([0.8, 0.9]) + c * np.sqrt(2 * math.log(n_parent) / np.array([2, 1]))
    for bonus in (0.0, 10.0):  # slot 2 (value 0) scores the bonus
        expected = int(np.argmax([*uct, bonus]))
        assert select(tree, c=c, unvisited="value", bonus=bonus) == expected, (c, bonus)


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0, 4.0])
def test_uct_formula(c):
    rng = np.random.default_rng(0)
    for _ in range(5):
        visits = rng.integers(1, 20, size=6)
        q = rng.uniform(size=6)
        n_parent = 1 + visits.sum()
        expected = np.argmax(q + c * np.sqrt(2 * math.log(n_parent) / visits))
        assert select(one_node_tree(rng.normal(size=6), visits, q), c=c) == expected


def test_q_is_not_min_max_normalised():
    # Q 0.50 vs 0.51: raw, the exploration term of the less visited slot 0 wins; min-max per node would
    # stretch the 0.01 gap to 1 and pick slot 1.
    tree = one_node_tree([0.0, 0.0], visits=[4, 8], qvalues=[0.50, 0.51])
    assert select(tree, c=0.1) == 0
    assert select(tree, c=0.0) == 1


@pytest.mark.parametrize("unvisited", ["prior", "value"])
def test_invalid_slots_never_selected(unvisited):
    # Invalid slots: the sentinel, shifted sentinels down to half of it; they are unvisited (and valued high),
    # so unvisited-first or V + bonus would take them if they counted as valid.
    logits = [INVALID_LOGIT, 0.3, INVALID_LOGIT / 2, INVALID_LOGIT + 3.0]
    values = [1.0, 0.0, 1.0, 1.0]
    tree = one_node_tree(logits, visits=[0, 2, 0, 0], qvalues=[0, 0.1, 0, 0], values=values)
    assert select(tree, c=10.0, unvisited=unvisited) == 1
    assert select(one_node_tree(logits, values=values), root=True, unvisited=unvisited) == 1


@pytest.mark.parametrize("unvisited", ["prior", "value"])
def test_all_invalid_gives_action_0(unvisited):
    tree = one_node_tree([INVALID_LOGIT] * 3, values=[0.1, 0.9, 0.5])
    assert select(tree, unvisited=unvisited) == 0
    assert select(tree, root=True, unvisited=unvisited) == 0


def test_root_mask_applies_at_the_root_only():
    tree = one_node_tree([0.0, 5.0, 1.0], root_invalid=[0, 1, 0], values=[0.1, 0.9, 0.5])
    for unvisited in ("prior", "value"):  # slot 1 has the best prior and the best value
        assert select(tree, root=True, unvisited=unvisited) == 2
        assert select(tree, unvisited=unvisited) == 1


def test_root_invalid_actions():
    logits = jnp.array([[0.0, INVALID_LOGIT, 1.0, -3.0]])
    np.testing.assert_array_equal(root_invalid_actions(logits), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(root_invalid_actions(logits, jnp.array([[0, 0, 0, 1]])), [[0, 1, 0, 1]])
    assert root_invalid_actions(logits).dtype == logits.dtype


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'beam_search'"):
        run_mcts(None, None, None, None, rule="beam_search", num_simulations=4, max_depth=None, c=1.0)
