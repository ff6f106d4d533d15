"""Value models out as Hugging Face folders (backbone + head file) and back with the same values."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxreason.models import (
    CausalLM,
    ModelConfig,
    ValueModel,
    load_value_model,
    save_pretrained,
    save_value_model,
)
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.lora import add_lora

VOCAB = 100  # the char tokenizer's size
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, head_dim=8,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama_gqa_tied": ModelConfig(**COMMON, num_kv_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "qwen2_bias_untied": ModelConfig(**COMMON, num_kv_heads=2, tie_word_embeddings=False, attention_bias=True,
                                     rope_theta=1000000.0, rms_norm_eps=1e-6, architecture="Qwen2ForCausalLM"),
}


def _perturbed(model, seed):
    """`model` with noise on every parameter: norm scales off one, q/k/v biases and the head off zero."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, noisy))
    return nnx.merge(graphdef, state)


def _value_model(name, seed=0):
    return _perturbed(ValueModel(CONFIGS[name], rngs=nnx.Rngs(seed)), seed + 1)


def _padded_batch():
    """Three rows: right-padded, left-padded and full. Returns ids, mask [3, 10]."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB, size=(3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[0, 7:] = 0
    mask[1, :3] = 0
    ids[mask == 0] = 0
    return ids, mask


def _logits(model):
    ids, mask = _padded_batch()
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A value folder (tied Llama, with tokenizer) written once; tests that damage it work on a copy."""
    folder = tmp_path_factory.mktemp("value") / "prm"
    save_value_model(_value_model("llama_gqa_tied"), folder, build_char_tokenizer())
    return folder


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "prm")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_the_same_values_at_every_position(name, tmp_path):
    model = _value_model(name)
    tokenizer = build_char_tokenizer() if name == "llama_gqa_tied" else None
    folder = save_value_model(model, tmp_path / "prm", tokenizer)
    assert sorted(p.name for p in folder.iterdir() if "token" not in p.name) == [
        "config.json", "model.safetensors", "value_head.json", "value_head.safetensors"]
    loaded, loaded_tokenizer = load_value_model(folder)
    assert loaded.config == model.config
    assert float(jnp.abs(loaded.head[...]).min()) > 0 and float(loaded.bias[...]) != 0
    ids, mask = _padded_batch()
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    np.testing.assert_array_equal(np.asarray(loaded.values(ids, mask)), np.asarray(model.values(ids, mask)))
    if tokenizer is None:
        assert loaded_tokenizer is None
    else:
        assert loaded_tokenizer.encode("12 + 7") == tokenizer.encode("12 + 7")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_hidden_states_times_the_head_file_give_our_values(name, tmp_path):
    """What a user without jaxreason does: AutoModel on the folder, the head file read with safetensors, then
    sigmoid(hidden @ head + bias) at each real token."""
    model = _value_model(name)
    folder = save_value_model(model, tmp_path / "prm")
    backbone, info = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    head = load_file(str(folder / "value_head.safetensors"))
    card = json.loads((folder / "value_head.json").read_text())
    assert card["tensors"]["head"]["shape"] == list(head["head"].shape) == [model.config.hidden_size]
    assert card["tensors"]["bias"]["shape"] == list(head["bias"].shape) == []
    ids, mask = _padded_batch()
    with torch.no_grad():
        hidden = backbone.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0), dtype=torch.long),
        ).last_hidden_state.numpy()
    ref = hidden @ head["head"] + head["bias"]
    ours = _logits(model)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max() < 1e-4
    np.testing.assert_allclose(np.asarray(model.values(ids, mask))[real], 1 / (1 + np.exp(-ref[real])), atol=1e-5)


def test_shared_backbone_is_written_in_full(tmp_path):
    """A PRM on the policy's backbone (untied LM head): the folder holds that backbone and no LM head, and loads
    into a value model with a backbone of its own and the same values."""
    config = CONFIGS["qwen2_bias_untied"]
    policy = _perturbed(CausalLM(config, rngs=nnx.Rngs(0)), 1)
    prm = ValueModel(config, backbone=policy.transformer, rngs=nnx.Rngs(2))
    prm.head[...] = jax.random.normal(jax.random.key(3), prm.head[...].shape)
    prm.bias[...] = jnp.asarray(-0.5)
    folder = save_value_model(prm, tmp_path / "prm")
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(policy.transformer.embed[...]))
    loaded, _ = load_value_model(folder)
    assert loaded.transformer is not policy.transformer
    np.testing.assert_array_equal(_logits(loaded), _logits(prm))


def test_adapters_are_folded_into_the_backbone(tmp_path):
    model = _value_model("llama_gqa_tied")
    add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(5))
    mlp = model.transformer.layers.mlp
    mlp.up_lora_b[...] = 0.3 * jax.random.normal(jax.random.key(6), mlp.up_lora_b[...].shape)
    loaded, _ = load_value_model(save_value_model(model, tmp_path / "prm"))
    np.testing.assert_allclose(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)


def test_dtypes_as_load_pretrained(saved):
    half, _ = load_value_model(saved, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    full, _ = load_value_model(saved)
    assert half.head[...].dtype == half.transformer.embed[...].dtype == jnp.bfloat16
    assert full.head[...].dtype == full.transformer.embed[...].dtype == jnp.float32
    ids, mask = _padded_batch()
    np.testing.assert_allclose(np.asarray(half.values(ids, mask)), np.asarray(full.values(ids, mask)), atol=0.05)


def test_a_policy_folder_has_no_value_head(tmp_path):
    model = CausalLM(CONFIGS["llama_gqa_tied"], rngs=nnx.Rngs(0))
    folder = save_pretrained(model, None, tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match=r"value_head\.safetensors: missing.*load_pretrained"):
        load_value_model(folder)


def test_missing_config_names_the_file(copy_of_saved):
    (copy_of_saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"prm/config\.json: missing"):
        load_value_model(copy_of_saved)


def test_a_head_of_the_wrong_shape_names_the_file_and_tensor(copy_of_saved):
    save_file({"head": np.ones(33, np.float32), "bias": np.zeros((), np.float32)},
              str(copy_of_saved / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"value_head\.safetensors: tensor 'head' has shape \(33,\), expected \(32,\)"):
        load_value_model(copy_of_saved)


def test_a_missing_bias_names_the_file_and_tensor(copy_of_saved):
    save_file({"head": np.ones(32, np.float32)}, str(copy_of_saved / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"value_head\.safetensors: missing tensor 'bias'"):
        load_value_model(copy_of_saved)


def test_a_card_of_another_format_is_refused(copy_of_saved):
    (copy_of_saved / "value_head.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=r"value_head\.json: format 'something-else'"):
        load_value_model(copy_of_saved)


def _likelihood_model(name, seed=0):
    """A value model that reads its LM's likelihood, every parameter perturbed (the LM head of an untied one too)."""
    return _perturbed(ValueModel(CONFIGS[name], likelihood=True, rngs=nnx.Rngs(seed)), seed + 1)


SOLUTION_START = np.array([3, 5, 4], np.int32)  # columns of _padded_batch's rows where their solutions start


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_likelihood_model_matches_transformers_causal_lm(name, tmp_path):
    """The folder of a model that reads the likelihood is a causal LM for transformers (tied embedding or its
    lm_head); its log-probabilities, minimised over each row's solution tokens, plus the head file's terms give
    our logits, and the folder loads back with the same values."""
    model = _likelihood_model(name)
    folder = save_value_model(model, tmp_path / "prm")
    card = json.loads((folder / "value_head.json").read_text())
    assert card["likelihood"] is True and "scale" in card["tensors"]
    lm, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = lm.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0), dtype=torch.long),
            output_hidden_states=True)
    hidden = out.hidden_states[-1].numpy()
    logp = torch.log_softmax(out.logits, -1).numpy()
    head = load_file(str(folder / "value_head.safetensors"))
    ref = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        lowest = 0.0
        for t in range(ids.shape[1]):
            if t >= SOLUTION_START[b] and mask[b, t] and mask[b, t - 1]:
                lowest = min(lowest, logp[b, t - 1, ids[b, t]])
            ref[b, t] = hidden[b, t] @ head["head"] + head["bias"] + head["scale"] * lowest
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), solution_start=jnp.asarray(SOLUTION_START)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max() < 1e-4
    loaded, _ = load_value_model(folder)
    assert loaded.likelihood and loaded.config == model.config
    np.testing.assert_array_equal(
        np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask), solution_start=jnp.asarray(SOLUTION_START))), ours)


def test_a_likelihood_model_needs_the_solution_start():
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="solution_start"):
        _likelihood_model("llama_gqa_tied")(jnp.asarray(ids), jnp.asarray(mask))
