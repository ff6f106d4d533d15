"""LoRA adapters: a no-op at init, trained alone with the base frozen, disabled = the base, merged on export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxreason import sharding
from jaxreason.models import CausalLM, ModelConfig, load_pretrained, save_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.lora import LoRAParam, add_lora, lora_disabled
from jaxreason.train.objectives import sft_objective
from jaxreason.train.step import init_train_state, make_train_step

TOKENIZER = build_char_tokenizer()
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
IDS = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12]] * 2, jnp.int32)


def _lora_model():
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    base = np.asarray(model(IDS))
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    return model, base


def test_adapters_start_as_identity_and_disable_to_base():
    model, base = _lora_model()
    np.testing.assert_allclose(np.asarray(model(IDS)), base, rtol=1e-6)
    layers = model.transformer.layers
    assert layers.attention.q_lora_a[...].shape == (2, 32, 4)
    assert layers.attention.o_lora_a[...].shape == (2, 4, 8, 4)
    assert layers.attention.o_lora_b[...].shape == (2, 4, 32)


def test_only_adapters_train_and_reference_shares_base(tmp_path):
    model, base = _lora_model()
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = optax.adam(1e-2)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh, trainable=LoRAParam)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state.trainable))
    frozen_before = jax.tree.map(np.asarray, nnx.to_pure_dict(state.frozen))
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh)
    batch = {"tokens": np.asarray(IDS), "attention_mask": np.ones((2, 8), np.int32),
             "loss_mask": np.ones((2, 8), np.int32)}
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state.frozen), frozen_before)
    trained = nnx.merge(graphdef, state.trainable, state.frozen)
    assert not np.allclose(np.asarray(trained(IDS)), base, atol=1e-4)
    with lora_disabled(trained):  # the reference model: the frozen base, no copy
        np.testing.assert_allclose(np.asarray(trained(IDS)), base, rtol=1e-5, atol=1e-6)
    # Export folds the adapters into the kernels.
    save_pretrained(trained, TOKENIZER, tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(np.asarray(merged(IDS)), np.asarray(trained(IDS)), rtol=1e-4, atol=1e-5)
