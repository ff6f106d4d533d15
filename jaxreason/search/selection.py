"""Selection rules on mctx: ReST-MCTS*'s UCT as mctx action-selection functions, its value backup, and one
entry point that runs any of the three rules (ReST-MCTS*, MuZero, Gumbel MuZero) and returns the search tree.

A node's children are the K candidate next steps sampled when the node was created; a slot the node may not
take (no candidate, a forbidden action type, nothing at all below a terminal node) carries the prior logit
`INVALID_LOGIT`. mctx masks invalid actions at the root only, so everywhere below the root the prior logits
are the mask.

ReST-MCTS*'s reference expansion visits a new node's best child at once (`NodeState.rolled_slot`, its value
`rolled_value`), without making it a node: mctx makes one node per simulation. The rule and the backup here
count that visit, so the visit counts and values are the reference's: the child counts one visit more than
mctx's own counts say, and its value stands in for the child until a simulation takes it.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import mctx

from jaxreason.search.config import RULES
from jaxreason.search.node import NO_SLOT, NodeState

INVALID_LOGIT = -1e9
"""Prior logit of an action slot that may not be taken. Finite, not -inf: a terminal node has every slot
invalid, and a softmax over all -inf (mctx's MuZero and Gumbel rules take one) would be NaN."""



def is_valid_action(prior_logits: chex.Array) -> chex.Array:
    """True where a slot may be taken. Half the sentinel as threshold, so shifted logits (a log-softmax,
    mctx's max subtraction, Gumbel noise) still read as invalid."""
    return prior_logits > INVALID_LOGIT / 2


def _child_visits_and_values(tree: mctx.Tree, node_index: chex.Numeric):
    """[K] each child's visit count and value at one node of an unbatched tree, the visit a node's creation
    paid its best child (`rolled_slot`) included: Q (reward + discount * value) of a visited child, the rolled
    value of a child visited only so, and its verifier value (`candidate_values`) otherwise."""
    emb: NodeState = tree.embeddings
    visits = tree.children_visits[node_index]
    phantom = jnp.arange(visits.shape[0]) == emb.rolled_slot[node_index]
    values = jnp.where(visits > 0, tree.qvalues(node_index),
                       jnp.where(phantom, emb.rolled_value[node_index], emb.candidate_values[node_index]))
    return visits + phantom, values


def _node_visits(tree: mctx.Tree, node_index: chex.Numeric) -> chex.Array:
    """A node's visit count, the visit its creation's parent paid it (as its best child) included."""
    parent = tree.parents[node_index]
    emb: NodeState = tree.embeddings
    rolled = (parent >= 0) & (tree.action_from_parent[node_index] == emb.rolled_slot[jnp.maximum(parent, 0)])
    return tree.node_visits[node_index] + rolled


def _uct_action(tree: mctx.Tree, node_index: chex.Numeric, valid: chex.Array, c: chex.Numeric,
                unvisited: str, unvisited_bonus: chex.Numeric) -> chex.Array:
    """ReST-MCTS*'s choice among the `valid` children of one node of an unbatched tree.

    A visited child scores V + c * sqrt(2 ln N_parent / N_child), V its value on the verifier's [0, 1] scale
    (no per-node min-max, which would stretch a 0.01 difference to the whole range). An unvisited one scores
    V + `unvisited_bonus` with V its verifier value (unvisited="value", the reference's V + INF), or comes
    before every visited child, the highest prior logit first (unvisited="prior"). Ties go to the lowest index.
    With no valid slot the argmax over all -inf is action 0, as in mctx's own `masked_argmax`; this only
    happens at terminal nodes, where the recurrent function's expansion is a no-op.
    """
    visits, values = _child_visits_and_values(tree, node_index)
    n_parent = _node_visits(tree, node_index).astype(values.dtype)
    # max(visits, 1) only keeps unvisited slots finite; they never take this branch.
    uct = values + c * jnp.sqrt(2.0 * jnp.log(n_parent) / jnp.maximum(visits, 1).astype(values.dtype))
    fresh = valid & (visits == 0)
    if unvisited == "value":
        score = jnp.where(fresh, values + unvisited_bonus, uct)
    else:
        score = jnp.where(jnp.any(fresh), jnp.where(fresh, tree.children_prior_logits[node_index], -jnp.inf), uct)
    return jnp.argmax(jnp.where(valid, score, -jnp.inf)).astype(jnp.int32)


def rest_mcts_root_selection(rng_key: chex.PRNGKey, tree: mctx.Tree, node_index: chex.Numeric, *,
                             c: chex.Numeric, unvisited: str = "value", unvisited_bonus: float = 1.0) -> chex.Array:
    """mctx `RootActionSelectionFn`: ReST-MCTS*'s UCT, also honouring the tree's `root_invalid_actions`."""
    del rng_key  # deterministic: ties go to the lowest index
    valid = is_valid_action(tree.children_prior_logits[node_index]) & (tree.root_invalid_actions == 0)
    return _uct_action(tree, node_index, valid, c, unvisited, unvisited_bonus)


def rest_mcts_interior_selection(rng_key: chex.PRNGKey, tree: mctx.Tree, node_index: chex.Numeric,
                                 depth: chex.Numeric, *, c: chex.Numeric, unvisited: str = "value",
                                 unvisited_bonus: float = 1.0) -> chex.Array:
    """mctx `InteriorActionSelectionFn`: ReST-MCTS*'s UCT over the slots whose prior logit is valid."""
    del rng_key, depth  # deterministic; the rule is the same at every depth
    valid = is_valid_action(tree.children_prior_logits[node_index])
    return _uct_action(tree, node_index, valid, c, unvisited, unvisited_bonus)


def children_mean_backup(tree: mctx.Tree, depth: int) -> mctx.Tree:
    """The tree with ReST-MCTS*'s node values: a node with a visited child takes the visit-weighted mean of its
    children's values, N_a (reward_a + discount_a * V_a) summed over its visited children a and divided by
    their visits (the visit its creation paid its best child included); any other node keeps its own value.
    Recomputed bottom-up from the nodes' own values, `depth` levels (at least the tree's height); what mctx's
    running-mean backward wrote is replaced, the visit counts are kept.
    """

    def one_tree(t: mctx.Tree) -> mctx.Tree:
        emb: NodeState = t.embeddings
        slots = jnp.arange(t.children_visits.shape[1])
        phantom = (slots[None, :] == emb.rolled_slot[:, None]) & (emb.rolled_slot[:, None] != NO_SLOT)
        visited = t.children_index >= 0
        counts = (t.children_visits + phantom).astype(t.node_values.dtype)
        children = jnp.maximum(t.children_index, 0)

        def level(values, _):
            q = t.children_rewards + t.children_discounts * values[children]
            q = jnp.where(visited, q, emb.rolled_value[:, None])  # only the phantom visit counts there
            q = jnp.where(visited | phantom, q, 0.0)
            total = jnp.sum(counts * (visited | phantom), axis=1)
            mean = jnp.sum(counts * q, axis=1) / jnp.maximum(total, 1)
            return jnp.where(total > 0, mean, t.raw_values), None

        values, _ = jax.lax.scan(level, t.raw_values, None, length=depth)
        return t.replace(node_values=values, children_values=jnp.where(visited, values[children], 0.0))

    return jax.vmap(one_tree)(tree)


def root_invalid_actions(prior_logits: chex.Array, invalid_actions: chex.Array | None = None) -> chex.Array:
    """[B, K] mctx's root mask (1 = invalid, in the logits' dtype): invalid logits, or-ed with `invalid_actions`.

    MuZero's Dirichlet noise would otherwise give mass back to invalid root slots.
    """
    invalid = ~is_valid_action(prior_logits)
    if invalid_actions is not None:
        invalid = invalid | invalid_actions.astype(bool)
    return invalid.astype(prior_logits.dtype)


def run_mcts(
    params: Any,
    rng_key: chex.PRNGKey,
    root: mctx.RootFnOutput,
    recurrent_fn: mctx.RecurrentFn,
    *,
    rule: str,
    num_simulations: int,
    max_depth: int | None,
    c: chex.Numeric,
    invalid_actions: chex.Array | None = None,
    unvisited: str = "value",
    unvisited_bonus: float = 1.0,
    backup: str = "running_mean",
    gumbel_scale: float = 1.0,
    max_num_considered_actions: int = 16,
) -> mctx.Tree:
    """Runs one batched search and returns its `mctx.Tree` (the input of trace extraction).

    Args:
      params, rng_key, root, recurrent_fn: as in `mctx.search`.
      rule: "rest_mcts" (ReST-MCTS*'s UCT through `mctx.search`), "muzero" (`mctx.muzero_policy`, PUCT with
        Dirichlet noise at the root) or "gumbel" (`mctx.gumbel_muzero_policy`, Sequential Halving at the root).
      num_simulations: simulations, i.e. expansions; the tree has num_simulations + 1 nodes.
      max_depth: the most edges a simulation descends (None: no limit).
      c: exploration constant: ReST-MCTS*'s UCT c, MuZero's pb_c_init; Gumbel MuZero has none and ignores it.
      invalid_actions: [B, K] optional extra root mask (1 = invalid), added to the invalid root logits.
      unvisited, unvisited_bonus: how "rest_mcts" treats unvisited children (`_uct_action`).
      backup: "running_mean" (mctx's) or "children_mean" (`children_mean_backup` after every simulation; the
        tree's embeddings must be `NodeState`s).
      gumbel_scale: Gumbel noise scale at the root ("gumbel" only; 0 makes the rule deterministic).
      max_num_considered_actions: root actions Sequential Halving starts from ("gumbel" only).
    """
    if rule not in RULES:
        raise ValueError(f"unknown search rule {rule!r}; expected one of {', '.join(RULES)}")
    invalid = root_invalid_actions(root.prior_logits, invalid_actions)
    common = dict(
        params=params,
        rng_key=rng_key,
        root=root,
        recurrent_fn=recurrent_fn,
        num_simulations=num_simulations,
        max_depth=max_depth,
        invalid_actions=invalid,
    )
    if backup == "children_mean":
        height = (max_depth or num_simulations) + 1

        def loop_fn(lower, upper, body, state):  # mctx's simulations, each followed by the reference's backup
            def simulation(i, loop_state):
                key, tree = body(i, loop_state)
                return key, children_mean_backup(tree, height)
            return jax.lax.fori_loop(lower, upper, simulation, state)

        common["loop_fn"] = loop_fn
    elif backup != "running_mean":
        raise ValueError(f"unknown backup {backup!r}; expected 'children_mean' or 'running_mean'")
    if rule == "rest_mcts":
        options = dict(c=c, unvisited=unvisited, unvisited_bonus=unvisited_bonus)
        return mctx.search(
            root_action_selection_fn=functools.partial(rest_mcts_root_selection, **options),
            interior_action_selection_fn=functools.partial(rest_mcts_interior_selection, **options),
            **common,
        )
    if rule == "muzero":
        # PRM values already lie in [0, 1]: a fixed min-max keeps Q on that scale instead of re-stretching
        # each node's spread as the default qtransform does.
        qtransform = functools.partial(mctx.qtransform_by_min_max, min_value=0.0, max_value=1.0)
        return mctx.muzero_policy(**common, qtransform=qtransform, pb_c_init=c).search_tree
    # Completed Q (unvisited children take the mixed value estimate) without per-node rescaling, for the same
    # reason; mctx still multiplies Q by (50 + max visits) * 0.1, so a PRM gap of 0.1 is worth 0.5+ in logits,
    # on a par with the length-normalised prior logits it is added to.
    qtransform = functools.partial(mctx.qtransform_completed_by_mix_value, rescale_values=False)
    return mctx.gumbel_muzero_policy(
        **common,
        qtransform=qtransform,
        gumbel_scale=gumbel_scale,
        max_num_considered_actions=max_num_considered_actions,
    ).search_tree
