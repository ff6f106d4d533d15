"""The value-head model: shapes, padding invariance, and sharing the policy's backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxreason.models import CausalLM, ModelConfig, ValueModel

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)


def test_values_per_position_and_padding_invariant():
    model = ValueModel(CONFIG, rngs=nnx.Rngs(0))
    model.head[...] = jax.random.normal(jax.random.key(1), model.head[...].shape)
    ids = jnp.asarray([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model(ids, mask)
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[0, 2:], out[1, :3], rtol=1e-5, atol=1e-6)
    v = model.values(ids, mask)
    assert bool(jnp.all((v > 0) & (v < 1)))


def test_fresh_head_is_near_neutral():
    ids = jnp.asarray(np.arange(60).reshape(3, 20) % 50)
    np.testing.assert_allclose(ValueModel(CONFIG, rngs=nnx.Rngs(0)).values(ids), 0.5, atol=0.25)
    np.testing.assert_allclose(ValueModel(CONFIG, head_init=0.0, rngs=nnx.Rngs(0)).values(ids), 0.5)


def test_shared_backbone_trains_with_the_policy():
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    prm = ValueModel(CONFIG, backbone=policy.transformer, rngs=nnx.Rngs(1))
    assert prm.transformer is policy.transformer
    before = np.asarray(policy(jnp.ones((1, 4), jnp.int32)))
    optimizer = nnx.Optimizer(prm, optax.sgd(0.1), wrt=nnx.Param)
    loss = lambda m: jnp.mean((m(jnp.ones((1, 4), jnp.int32)) - 1.0) ** 2)
    optimizer.update(prm, nnx.grad(loss)(prm))  # the random head passes gradient to the backbone at once
    assert not np.allclose(np.asarray(policy(jnp.ones((1, 4), jnp.int32))), before)
