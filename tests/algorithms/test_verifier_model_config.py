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


@pytest.mark.parametrize("tied", [True, False])
def test_a_likelihood_prm_starts_from_the_policys_language_model(tied):
    """Its logit at a solution token is the head's plus the lowest log-probability the policy gives a solution
    token so far (the policy's own LM: tied embedding, or a copy of its lm_head)."""
    import dataclasses

    model, _ = build_model(ModelSpec(scratch=dataclasses.replace(TINY, tie_word_embeddings=tied)), seed=0)
    prm = value_model_from(model, seed=1, likelihood=True)
    assert prm.likelihood and (tied or prm.lm_head is not model.lm_head)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % model.config.vocab_size
    mask, start = jnp.ones_like(tokens), jnp.asarray([3, 5])
    logp = jax.nn.log_softmax(model(tokens, mask), axis=-1)
    token_logp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    counted = jnp.arange(1, 8)[None, :] >= start[:, None]
    lowest = jnp.pad(jax.lax.cummin(jnp.where(counted, token_logp, 0.0), axis=1), ((0, 0), (1, 0)))
    hidden, _ = prm.transformer(tokens, mask)
    head = hidden @ prm.head[...] + prm.bias[...]
    np.testing.assert_allclose(prm(tokens, mask, solution_start=start), head + lowest, atol=1e-5)


def test_a_prm_with_lora_trains_its_adapters_and_head_alone(policy, tmp_path):
    """`prm_lora` reaches the PRM: adapters on its backbone's kernels, trained with its head while the base
    weights stay; the adapters keep the policy's dtype and remat."""
    from jaxreason.algorithms.model_states import value_parameters
    from jaxreason.data.batching import shuffled_batches
    from jaxreason.data.trace_batches import value_batch
    from jaxreason.data.trace_store import Trace
    from jaxreason.models.lora import LoRAParam
    from jaxreason.sharding import make_mesh
    from jaxreason.train.fit import FitConfig, fit
    from jaxreason.train.objectives import value_objective
    from jaxreason.train.optimizer import OptimizerConfig
    from jaxreason.train.sft import LoRAConfig

    prm = value_model_from(policy, seed=1, likelihood=True, lora=LoRAConfig(rank=2))
    _check_follows_config(prm)
    assert jax.tree.leaves(nnx.state(prm, LoRAParam))
    before = jax.tree.map(np.array, nnx.state(prm))
    traces = [Trace(problem_id=0, iteration=0, tokens=np.arange(3, 9, dtype=np.int32), prompt_len=2,
                    step_ends=np.asarray([4, 6], np.int32), step_values=np.asarray([0.9, 0.1], np.float32),
                    reward=0.0, flags=0)] * 2
    batches = shuffled_batches(lambda idx: value_batch([traces[i] for i in idx], 8, 0), 2, 2, 0)
    fit(prm, value_objective("bce"), batches,
        FitConfig(num_steps=2, batch_size=2, max_len=8, optimizer=OptimizerConfig(learning_rate=0.05, warmup_steps=0)),
        mesh=make_mesh(devices=jax.devices()[:1]), directory=tmp_path, seed=0, description="prm",
        trainable=value_parameters(lora=True))
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), nnx.state(prm), before)
    flat = {jax.tree_util.keystr(path): moved for path, moved in jax.tree_util.tree_flatten_with_path(changed)[0]}
    assert any(moved for name, moved in flat.items() if "lora" in name)
    head = [moved for name, moved in flat.items() if name.startswith(("['head']", "['scale']"))]
    assert len(head) == 2 and all(head)
    assert not any(moved for name, moved in flat.items() if "lora" not in name and "transformer" in name)
    with pytest.raises(ValueError, match="not both"):
        value_parameters(train_backbone=False, lora=True)


def test_language_model_verifiers_take_lora_and_keep_dtype_and_remat(policy):
    """GenRM's and the DPO verifier's copies with `lora`: adapters on the copy (what `lm_parameters` trains), the
    policy's dtype and remat kept; the DPO reference is the same model with its adapters off, so the implicit
    reward starts at zero, as it does with a second copy."""
    from jaxreason.algorithms.model_states import dpo_verifier_from, lm_copy, lm_parameters
    from jaxreason.models.lora import LoRAParam
    from jaxreason.train.sft import LoRAConfig

    lora = LoRAConfig(rank=2)
    genrm = lm_copy(policy, snapshot(policy), seed=1, lora=lora)
    _check_follows_config(genrm)
    assert jax.tree.leaves(nnx.state(genrm, LoRAParam)) and lm_parameters(True) is LoRAParam
    assert lm_parameters(False) is nnx.Param and not jax.tree.leaves(nnx.state(lm_copy(policy, snapshot(policy), 1),
                                                                               LoRAParam))
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % policy.config.vocab_size
    for adapted in (True, False):
        verifier = dpo_verifier_from(policy, snapshot(policy), beta=0.5, seed=1, lora=lora if adapted else None)
        assert (verifier.reference is None) == adapted and verifier.model is not policy
        np.testing.assert_allclose(verifier.rewards(tokens, jnp.ones_like(tokens)), 0.0, atol=1e-6)
