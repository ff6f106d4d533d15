"""The model config's dtype and remat reach every model a run builds from its policy: the PRM / ORM / reward
model (`value_model_from`), the copies GenRM, DPO and the judge start from (`copy_of`), and a verifier loaded
from a folder for search (`load_verifier`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.algorithms.model_states import copy_of, snapshot, value_model_from
from jaxreason.models.pretrained import save_value_model
from jaxreason.models.spec import ModelSpec, ScratchModel, build_model
from jaxreason.search.command import VerifierConfig, load_verifier

TINY = ScratchModel(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def policy():
    model, _ = build_model(ModelSpec(scratch=TINY, dtype="bfloat16", remat=True), seed=0)
    return model


def _check_follows_config(model):
    backbone = model.transformer
    assert backbone.dtype == jnp.bfloat16 and backbone.remat is True
    # master weights stay float32; the compute is bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % model.config.vocab_size
    hidden, _ = backbone(tokens, jnp.ones_like(tokens), None, None)
    assert hidden.dtype == jnp.bfloat16


def test_value_models_compute_in_the_policy_dtype_and_remat(policy):
    for model in (value_model_from(policy, seed=1), value_model_from(policy, seed=1, state=snapshot(policy))):
        _check_follows_config(model)
        values = model(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))
        assert values.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(values)))


def test_policy_copies_keep_dtype_and_remat(policy):
    _check_follows_config(copy_of(policy, snapshot(policy)))


def test_loaded_verifier_follows_the_policy(policy, tmp_path):
    save_value_model(value_model_from(policy, seed=1), tmp_path / "prm")
    verifier = load_verifier(VerifierConfig(path=str(tmp_path / "prm")), policy)
    _check_follows_config(verifier.model)
