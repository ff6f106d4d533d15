"""Selection rules on mctx: ReST-MCTS*'s UCT as mctx action-selection functions, and one entry point that runs
any of the three rules (ReST-MCTS*, MuZero, Gumbel MuZero) and returns the search tree.

A node's children are the K candidate next steps sampled when the node was created; a slot the node may not
take (no candidate, a forbidden action type, nothing at all below a terminal node) carries the prior logit
`INVALID_LOGIT`. mctx masks invalid actions at the root only, so everywhere below the root the prior logits
are the mask.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax.numpy as jnp
import mctx

INVALID_LOGIT = -1e9
"""Prior logit of an action slot that may not be taken. Finite, not -inf: a terminal node has every slot
invalid, and a softmax over all -inf (mctx's MuZero and Gumbel rules take one) would be NaN."""

RULES = ("rest_mcts", "muzero", "gumbel")


def is_valid_action(prior_logits: chex.Array) -> chex.Array:
    """True where a slot may be taken. Half the sentinel as threshold, so shifted logits (a log-softmax,
    mctx's max subtraction, Gumbel noise) still read as invalid."""
    return prior_logits > INVALID_LOGIT / 2


def _uct_action(tree: mctx.Tree, node_index: chex.Numeric, valid: chex.Array, c: chex.Numeric) -> chex.Array:
    """ReST-MCTS*'s choice among the `valid` children of one node of an unbatched tree.

    Unvisited valid children come first, the highest prior logit among them (ties: lowest index); once all
    are visited, the highest Q + c * sqrt(2 ln N_parent / N_child) (ties: lowest index). With no valid slot
    the argmax over all -inf is action 0, as in mctx's own `masked_argmax`; this only happens at terminal
    nodes, where the recurrent function's expansion is a no-op.
    """
    logits = tree.children_prior_logits[node_index]
    visits = tree.children_visits[node_index]
    # Raw Q = reward + discount * child value, on the PRM's [0, 1] scale. No per-node min-max (mctx's
    # default qtransform): it would stretch a 0.01 PRM difference to the whole range and swamp the c term.
    q = tree.qvalues(node_index)
    n_parent = tree.node_visits[node_index].astype(q.dtype)
    # max(visits, 1) only keeps unvisited slots finite; they never reach this branch.
    uct = q + c * jnp.sqrt(2.0 * jnp.log(n_parent) / jnp.maximum(visits, 1).astype(q.dtype))
    unvisited = valid & (visits == 0)
    score = jnp.where(
        jnp.any(unvisited),
        jnp.where(unvisited, logits, -jnp.inf),
        jnp.where(valid, uct, -jnp.inf),
    )
    return jnp.argmax(score).astype(jnp.int32)


def rest_mcts_root_selection(
    rng_key: chex.PRNGKey, tree: mctx.Tree, node_index: chex.Numeric, *, c: chex.Numeric
) -> chex.Array:
    """mctx `RootActionSelectionFn`: ReST-MCTS*'s UCT, also honouring the tree's `root_invalid_actions`."""
    del rng_key  # deterministic: ties go to the lowest index
    valid = is_valid_action(tree.children_prior_logits[node_index]) & (tree.root_invalid_actions == 0)
    return _uct_action(tree, node_index, valid, c)


def rest_mcts_interior_selection(
    rng_key: chex.PRNGKey, tree: mctx.Tree, node_index: chex.Numeric, depth: chex.Numeric, *, c: chex.Numeric
) -> chex.Array:
    """mctx `InteriorActionSelectionFn`: ReST-MCTS*'s UCT over the slots whose prior logit is valid."""
    del rng_key, depth  # deterministic; the rule is the same at every depth
    valid = is_valid_action(tree.children_prior_logits[node_index])
    return _uct_action(tree, node_index, valid, c)


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
    if rule == "rest_mcts":
        return mctx.search(
            root_action_selection_fn=functools.partial(rest_mcts_root_selection, c=c),
            interior_action_selection_fn=functools.partial(rest_mcts_interior_selection, c=c),
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
