"""ReST-MCTS*'s selection rule on hand-made one-node trees: unvisited first by prior, then raw-Q UCT; invalid
slots never; the root mask; all-invalid falls back to action 0. And `run_mcts`'s argument checks."""

import math

import jax
import jax.numpy as jnp
import mctx
import numpy as np
import pytest

from jaxreason.search.selection import (
    INVALID_LOGIT,
    rest_mcts_interior_selection,
    rest_mcts_root_selection,
    root_invalid_actions,
    run_mcts,
)

KEY = jax.random.key(0)  # the rule is deterministic: any key


def one_node_tree(logits, visits=None, qvalues=None, root_invalid=None) -> mctx.Tree:
    """An unbatched tree whose node 0 has children with these prior logits, visit counts and Q-values."""
    logits = jnp.asarray(logits, jnp.float32)[None]
    k = logits.shape[-1]
    visits = jnp.zeros((1, k), jnp.int32) if visits is None else jnp.asarray(visits, jnp.int32)[None]
    qvalues = jnp.zeros((1, k)) if qvalues is None else jnp.asarray(qvalues, jnp.float32)[None]
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
        embeddings=jnp.zeros(1),
        root_invalid_actions=jnp.zeros(k) if root_invalid is None else jnp.asarray(root_invalid, jnp.float32),
        extra_data=None,
    )


def select(tree, c=1.0, root=False) -> int:
    if root:
        return int(rest_mcts_root_selection(KEY, tree, 0, c=c))
    return int(rest_mcts_interior_selection(KEY, tree, 0, 1, c=c))


def test_unvisited_first_by_prior_ties_to_lowest_index():
    # Slot 0 is visited with the best possible Q; the unvisited slots still come first.
    tree = one_node_tree([0.1, 2.0, 0.5, 2.0], visits=[3, 0, 0, 0], qvalues=[1.0, 0, 0, 0])
    assert select(tree) == 1
    assert select(tree, root=True) == 1


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


def test_invalid_slots_never_selected():
    # Invalid slots: the sentinel, shifted sentinels down to half of it; they are unvisited, so unvisited-first
    # would take them if they counted as valid.
    logits = [INVALID_LOGIT, 0.3, INVALID_LOGIT / 2, INVALID_LOGIT + 3.0]
    assert select(one_node_tree(logits, visits=[0, 2, 0, 0], qvalues=[0, 0.1, 0, 0]), c=10.0) == 1
    assert select(one_node_tree(logits), root=True) == 1


def test_all_invalid_gives_action_0():
    tree = one_node_tree([INVALID_LOGIT] * 3)
    assert select(tree) == 0
    assert select(tree, root=True) == 0


def test_root_mask_applies_at_the_root_only():
    tree = one_node_tree([0.0, 5.0, 1.0], root_invalid=[0, 1, 0])
    assert select(tree, root=True) == 2
    assert select(tree) == 1


def test_root_invalid_actions():
    logits = jnp.array([[0.0, INVALID_LOGIT, 1.0, -3.0]])
    np.testing.assert_array_equal(root_invalid_actions(logits), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(root_invalid_actions(logits, jnp.array([[0, 0, 0, 1]])), [[0, 1, 0, 1]])
    assert root_invalid_actions(logits).dtype == logits.dtype


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'beam_search'"):
        run_mcts(None, None, None, None, rule="beam_search", num_simulations=4, max_depth=None, c=1.0)
