"""bf16 compute runs the step's matmuls in bf16 on float32 master weights; remat recomputes, same numbers.

Both are read off the traced step (its jaxpr), so a model that ignored `dtype` or `remat` would fail here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import tiny
from flax import nnx

from jaxreason import sharding
from jaxreason.models import CausalLM
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

CONFIG = tiny.NUMERIC
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
BATCH = {
    "tokens": np.random.default_rng(0).integers(1, 64, (4, 16)).astype(np.int32),
    "attention_mask": np.ones((4, 16), np.int32),
    "loss_mask": np.ones((4, 16), np.int32),
}


def _one_step(**model_kwargs):
    """(state after one step, its metrics, the step's equations, nested jaxprs included)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0), **model_kwargs)
    graphdef, state, shardings = init_train_state(model, OPTIMIZER, mesh)
    step = make_train_step(graphdef, sft_objective, OPTIMIZER, shardings, mesh)
    equations = list(_equations(step.trace(state, BATCH).jaxpr.jaxpr))
    state, metrics = step(state, BATCH)
    return state, metrics, equations


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                    yield from _equations(sub.jaxpr)


def _matmul_dtypes(equations) -> list[set]:
    """The operand dtypes of every dot_general (forward and backward) in the step."""
    return [{v.aval.dtype for v in e.invars} for e in equations if e.primitive.name == "dot_general"]


def _remats(equations) -> list[str]:
    return [e.primitive.name for e in equations if "remat" in e.primitive.name or "checkpoint" in e.primitive.name]


def test_bf16_compute_with_float32_master_weights():
    state32, m32, eqs32 = _one_step()
    state16, m16, eqs16 = _one_step(dtype=jnp.bfloat16)
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert _matmul_dtypes(eqs32) and all(d == {f32} for d in _matmul_dtypes(eqs32))
    assert _matmul_dtypes(eqs16) and all(d == {bf16} for d in _matmul_dtypes(eqs16)), _matmul_dtypes(eqs16)
    # master weights and Adam moments stay float32 after the update
    for tree in (state16.trainable, state16.opt_state[1][0].mu, state16.opt_state[1][0].nu):
        assert {v.get_value().dtype for _, v in nnx.to_flat_state(tree)} == {f32}
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2 * float(m32["loss"])


def test_remat_recomputes_and_gives_the_same_step():
    plain, m_plain, eqs_plain = _one_step()
    remat, m_remat, eqs_remat = _one_step(remat=True)
    assert _remats(eqs_remat) and not _remats(eqs_plain)
    # the backward pass recomputes the layer's forward matmuls instead of reading saved activations
    assert len(_matmul_dtypes(eqs_remat)) > len(_matmul_dtypes(eqs_plain))
    np.testing.assert_allclose(float(m_remat["loss"]), float(m_plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_remat["grad_norm"]), float(m_plain["grad_norm"]), rtol=1e-5)
    for (_, a), (_, b) in zip(nnx.to_flat_state(remat.trainable), nnx.to_flat_state(plain.trainable)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-5, atol=1e-7)
