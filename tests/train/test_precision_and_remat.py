"""bf16 compute keeps float32 master weights; rematerialisation changes memory, not numbers."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreason import sharding
from jaxreason.models import CausalLM, ModelConfig
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
BATCH = {
    "tokens": np.random.default_rng(0).integers(1, 64, (4, 16)).astype(np.int32),
    "attention_mask": np.ones((4, 16), np.int32),
    "loss_mask": np.ones((4, 16), np.int32),
}


def _one_step(**model_kwargs):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0), **model_kwargs)
    graphdef, state, shardings = init_train_state(model, OPTIMIZER, mesh)
    step = make_train_step(graphdef, sft_objective, OPTIMIZER, shardings, mesh)
    state, metrics = step(state, BATCH)
    return state, metrics


def test_bf16_compute_with_float32_master_weights():
    state32, m32 = _one_step()
    state16, m16 = _one_step(dtype=jnp.bfloat16)
    dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(state16.trainable)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2 * float(m32["loss"])


def test_remat_gives_the_same_step():
    plain, m_plain = _one_step()
    remat, m_remat = _one_step(remat=True)
    np.testing.assert_allclose(float(m_remat["loss"]), float(m_plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_remat["grad_norm"]), float(m_plain["grad_norm"]), rtol=1e-5)
    for (_, a), (_, b) in zip(nnx.to_flat_state(remat.trainable), nnx.to_flat_state(plain.trainable)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-5, atol=1e-7)
