"""V-STaR's verifier data: pairs of the same problem, capped and distinct; problems with one kind of sample counted;
the reference's log-probs; and DPO on them starts at log 2 and learns the preference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx

from jaxreason.algorithms.preference_pairs import pair_batch, preference_pairs, with_reference
from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.models.lora import add_lora
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.train.losses import sequence_logprob
from jaxreason.train.objectives import dpo_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

PROMPT = [5, 6, 7]


def _trace(pid, solution, correct):
    tokens = np.asarray(PROMPT + solution, np.int32)
    return Trace(problem_id=pid, iteration=1, tokens=tokens, prompt_len=len(PROMPT),
                 step_ends=np.zeros(0, np.int32), step_values=np.zeros(0, np.float32), reward=float(correct),
                 flags=FLAG_CORRECT if correct else 0)


def _traces():
    return ([_trace(0, [10 + i], True) for i in range(3)] + [_trace(0, [20 + i], False) for i in range(2)]
            + [_trace(1, [30], True), _trace(1, [30], True), _trace(1, [40], False)]  # a repeated correct one
            + [_trace(2, [50], True)] + [_trace(3, [60], False), _trace(3, [61], False)])


def test_pairs_are_capped_distinct_and_of_one_problem():
    pairs, counts = preference_pairs(_traces(), max_per_problem=4, seed=0)
    assert counts == {"problems": 4, "problems_with_pairs": 2, "only_correct": 1, "only_incorrect": 1, "pairs": 5}
    for p in pairs:
        assert p.chosen.problem_id == p.rejected.problem_id
        assert p.chosen.flags & FLAG_CORRECT and not p.rejected.flags & FLAG_CORRECT
    keys = [(p.chosen.tokens.tobytes(), p.rejected.tokens.tobytes()) for p in pairs]
    assert len(set(keys)) == len(keys)
    assert sum(p.chosen.problem_id == 0 for p in pairs) == 4  # 6 combinations, capped at 4
    assert sum(p.chosen.problem_id == 1 for p in pairs) == 1  # the repeated solution pairs once
    everything, _ = preference_pairs(_traces(), max_per_problem=100, seed=0)
    assert len(everything) == 6 + 1
    with pytest.raises(ValueError, match="max_per_problem"):
        preference_pairs(_traces(), max_per_problem=0, seed=0)


def test_reference_log_probs_are_those_of_the_solution_given_the_prompt():
    model = tiny.policy(0)
    pairs, _ = preference_pairs(_traces(), max_per_problem=4, seed=0)
    scored = with_reference(pairs, model, max_len=16, pad_id=tiny.PAD, chunk_rows=4)  # chunks with copies
    for p in scored:
        for trace, value in ((p.chosen, p.ref_chosen), (p.rejected, p.ref_rejected)):
            tokens = jnp.asarray(trace.tokens)[None]
            mask = jnp.zeros_like(tokens).at[0, trace.prompt_len:].set(1)
            assert value == pytest.approx(float(sequence_logprob(model(tokens, jnp.ones_like(tokens)), tokens,
                                                                 mask)[0]), abs=1e-4)
    with pytest.raises(ValueError, match="more than max_len = 3"):
        with_reference(pairs, model, max_len=3, pad_id=tiny.PAD)


def test_a_lora_models_reference_is_its_base_even_after_training():
    base = tiny.policy(0)
    model = tiny.policy(0)
    add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    layers = model.transformer.layers
    for module in (layers.attention, layers.mlp):  # adapters as after training: B no longer zero
        for name, value in list(vars(module).items()):
            if name.endswith("_lora_b"):
                value[...] = jnp.full_like(value[...], 0.1)
    pairs, _ = preference_pairs(_traces(), max_per_problem=4, seed=0)
    tokens = jnp.asarray(pairs[0].chosen.tokens)[None]
    assert not np.allclose(model(tokens)[0], base(tokens)[0], atol=1e-3)  # the adapters change the model
    got = with_reference(pairs, model, max_len=8, pad_id=tiny.PAD)
    want = with_reference(pairs, base, max_len=8, pad_id=tiny.PAD)
    np.testing.assert_allclose([p.ref_chosen for p in got], [p.ref_chosen for p in want], rtol=1e-5)
    np.testing.assert_allclose([p.ref_rejected for p in got], [p.ref_rejected for p in want], rtol=1e-5)


def test_dpo_starts_at_log_two_and_learns_the_preference():
    model = tiny.policy(0)
    pairs, _ = preference_pairs(_traces(), max_per_problem=4, seed=0)
    batch = pair_batch(with_reference(pairs, model, max_len=8, pad_id=tiny.PAD), max_len=8, pad_id=tiny.PAD)
    assert batch["chosen_tokens"].shape == (5, 8) and batch["ref_rejected"].shape == (5,)
    objective = dpo_objective(0.5)
    loss, _ = objective(model, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)  # the policy is its own reference
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20, weight_decay=0))
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, objective, optimizer, shardings, mesh)
    for _ in range(20):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.3 and float(metrics["reward_accuracy"]) == 1.0
