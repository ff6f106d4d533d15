"""The language-model search's side of the reference expansion (tests/search/test_reference_mcts_star.py checks
the rest on synthetic trees): a new node visits its best candidate, rolled forward greedily, and backs up that
value.

With greedy sampling every candidate of a node is the same step, so only slot 0 is valid and the tree is a chain;
a node's roll-forward then samples exactly the steps its best child's own expansion samples later, which makes
the rolled value checkable against the tree: (1 - alpha) V(child) + alpha max V along the roll.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import CONFIG, TOKENIZER

from jaxreason.models import CausalLM, ValueModel
from jaxreason.sampling import SamplingConfig
from jaxreason.search import MCTSConfig, batched_trees
from jaxreason.search.node import NO_SLOT
from jaxreason.search.selection import is_valid_action
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier

TASK = get_task("arith", max_ops=2)
ALPHA = 0.4


@pytest.fixture(scope="module")
def models():
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    prm = ValueModel(CONFIG, rngs=nnx.Rngs(1))
    prm.head[...] = jax.random.normal(jax.random.key(2), prm.head.shape)
    return policy, prm


def _tree(models, rollout_steps, backup="children_mean", temperature=0.0):
    policy, prm = models
    config = MCTSConfig(num_simulations=5, num_candidates=3, max_depth=4, rollout_steps=rollout_steps,
                        rollout_alpha=ALPHA, backup=backup,
                        sampling=SamplingConfig(max_new_tokens=6, temperature=temperature))
    (tree, real), = batched_trees(TASK.problems("test", n=3, seed=0), policy=policy, verifier=ValueVerifier(prm),
                                  tokenizer=TOKENIZER, task=TASK, config=config, key=jax.random.key(3))
    return jax.device_get(tree), real


@pytest.mark.parametrize("rollout_steps", [0, 1])
def test_a_new_node_visits_its_best_candidate(models, rollout_steps):
    tree, real = _tree(models, rollout_steps)
    emb = tree.embeddings
    checked = 0
    for b in range(real):
        for n in np.flatnonzero(tree.node_visits[b] > 0):
            valid = is_valid_action(tree.children_prior_logits[b, n])
            if emb.terminal[b, n] or not valid.any():
                assert emb.rolled_slot[b, n] == NO_SLOT
                continue
            best = int(np.argmax(np.where(valid, emb.candidate_values[b, n], -np.inf)))
            assert emb.rolled_slot[b, n] == best
            start = emb.candidate_values[b, n, best]
            child = tree.children_index[b, n, best]
            if rollout_steps == 0 or emb.candidate_ends[b, n, best]:
                np.testing.assert_allclose(emb.rolled_value[b, n], start, atol=1e-6)
                checked += 1
            elif child >= 0 and not emb.terminal[b, child]:
                # one roll step: the best of the child's own candidates (the same greedy samples)
                child_valid = is_valid_action(tree.children_prior_logits[b, child])
                most = np.max(np.where(child_valid, emb.candidate_values[b, child], -np.inf))
                np.testing.assert_allclose(emb.rolled_value[b, n], (1 - ALPHA) * start + ALPHA * most, atol=1e-5)
                checked += 1
    assert checked >= 3


def test_running_mean_visits_no_best_child(models):
    tree, real = _tree(models, 0, backup="running_mean", temperature=1.0)
    assert (tree.embeddings.rolled_slot[:real][tree.node_visits[:real] > 0] == NO_SLOT).all()
