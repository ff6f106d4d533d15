"""The sharded train step on 8 fake CPU devices equals the one-device step, and lays state out by the rules."""

import jax
import numpy as np
import pytest
import tiny
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxreason import sharding
from jaxreason.models import CausalLM
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

CONFIG = tiny.NUMERIC
# Adam normalises each gradient element, so near-zero gradients (summed in another order on another
# mesh) move by up to ~lr: a small lr keeps those float32 differences inside atol.
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10))


def _batch(rows=8, length=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, (rows, length)).astype(np.int32)
    attention = np.ones_like(tokens)
    attention[::2, -3:] = 0  # some right padding
    loss_mask = attention.copy()
    loss_mask[:, :5] = 0  # the prompt
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def _uneven_batch():
    """Rows 0-3 (the first micro-batch of two) hold 10 completion tokens each, rows 4-7 hold 2."""
    batch = _batch()
    batch["attention_mask"][:] = 1
    batch["loss_mask"][:] = 0
    batch["loss_mask"][:4, 6:] = 1
    batch["loss_mask"][4:, -2:] = 1
    return batch


def _train(mesh, steps=2, grad_accum=1, batch=None):
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state, shardings = init_train_state(model, OPTIMIZER, mesh)
    step = make_train_step(graphdef, sft_objective, OPTIMIZER, shardings, mesh, grad_accum_steps=grad_accum)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, _batch() if batch is None else batch)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, losses, metrics


@pytest.fixture(scope="module")
def reference():
    return _train(sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_one_device(shape, reference):
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    state, losses, _ = _train(mesh)
    ref_state, ref_losses, _ = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, ours), (_, ref) in zip(nnx.to_flat_state(state.trainable), nnx.to_flat_state(ref_state.trainable)):
        np.testing.assert_allclose(np.asarray(ours.get_value()), np.asarray(ref.get_value()), rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(map(str, path)))

    # Layout: every parameter and its Adam moments are sharded as the logical rules say.
    layers = state.trainable["transformer"]["layers"]
    assert _spec(layers["attention"]["q"]) == _normalise(P(None, "fsdp", "tensor", None))
    assert _spec(layers["mlp"]["down"]) == _normalise(P(None, "tensor", "fsdp"))
    for path, var in nnx.to_flat_state(state.trainable):
        want = sharding.logical_to_spec(var.get_metadata()["out_sharding"], var.get_value().shape, mesh)
        assert _spec(var) == _normalise(want), path
        assert var.get_value().sharding.mesh.shape == mesh.shape
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        for (path, m), (_, p) in zip(nnx.to_flat_state(moments), nnx.to_flat_state(state.trainable)):
            assert _spec(m) == _spec(p), path
    assert adam.count.sharding.spec == P() and adam.count.sharding.mesh.shape == mesh.shape


def test_fsdp_really_splits_parameters():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 4, 1))
    state, _, _ = _train(mesh, steps=1)
    embed = state.trainable["transformer"]["embed"].get_value()  # [vocab, embed], embed over fsdp=4
    shard_shapes = {s.data.shape for s in embed.addressable_shards}
    assert shard_shapes == {(CONFIG.vocab_size, CONFIG.hidden_size // 4)}


@pytest.mark.parametrize("batch", [None, _uneven_batch()], ids=["equal_tokens", "uneven_tokens"])
def test_gradient_accumulation_equals_full_batch(batch):
    """Micro-batches are weighted by token count: 10 vs 2 tokens a row must not count as 1:1."""
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 1), devices=jax.devices()[:2])
    full, full_losses, full_metrics = _train(mesh, steps=2, batch=batch)
    accum, accum_losses, accum_metrics = _train(mesh, steps=2, grad_accum=2, batch=batch)
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
    for key in ("num_tokens", "accuracy"):
        np.testing.assert_allclose(float(accum_metrics[key]), float(full_metrics[key]), rtol=1e-6, err_msg=key)
    want_tokens = np.sum((_batch() if batch is None else batch)["loss_mask"][:, 1:])
    assert float(accum_metrics["num_tokens"]) == want_tokens  # the batch's total, not a per-micro-batch mean
    for (path, a), (_, b) in zip(nnx.to_flat_state(accum.trainable), nnx.to_flat_state(full.trainable)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4, atol=1e-6,
                                   err_msg="/".join(map(str, path)))


def _spec(var):
    return _normalise(var.get_value().sharding.spec)


def _normalise(spec):
    """PartitionSpec without trailing Nones, for comparison."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


def test_fresh_models_with_one_config_share_the_compiled_step():
    """Stage after stage a run trains a new model with the same config: the jitted step is reused, not rebuilt."""
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    config = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10)
    steps = []
    for seed in (1, 2):
        optimizer = make_optimizer(config)  # an equal config: the same transformation
        graphdef, state, shardings = init_train_state(CausalLM(CONFIG, rngs=nnx.Rngs(seed)), optimizer, mesh)
        steps.append(make_train_step(graphdef, sft_objective, optimizer, shardings, mesh))
        steps[-1](state, _batch())
    assert steps[0] is steps[1]
    other = make_optimizer(OptimizerConfig(learning_rate=2e-4, warmup_steps=0, total_steps=10))
    graphdef, _, shardings = init_train_state(CausalLM(CONFIG, rngs=nnx.Rngs(3)), other, mesh)
    assert make_train_step(graphdef, sft_objective, other, shardings, mesh) is not steps[0]
