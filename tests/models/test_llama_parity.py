"""Parity of the NNX decoder with transformers' PyTorch implementations on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxreason.models import KVCache, load_pretrained, save_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.kv_cache import PrefixGrid
from jaxreason.models.packing import Packing

VOCAB = 100  # the char tokenizer's size
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
CONFIGS = {
    "llama3_gqa_tied": lambda: transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    "qwen2_bias_untied": lambda: transformers.Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0,
    ),
    "mistral_window": lambda: transformers.MistralConfig(
        **COMMON, num_key_value_heads=1, tie_word_embeddings=False, sliding_window=5,
    ),
}


def _hf_model(name, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), torch_dtype=torch.float32)
    if name == "qwen2_bias_untied":  # zero-initialised biases would hide a bias bug
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    hf.eval()
    folder = tmp_path / name
    hf.save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return hf, folder


def _padded_batch():
    """Three rows of different lengths: right-padded, left-padded and full. Returns ids, mask [3, 12]."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB, size=(3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[0, 9:] = 0
    mask[1, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def _relative_error(ours, ref, mask):
    valid = mask.astype(bool)
    return np.abs(ours[valid] - ref[valid]).max() / np.abs(ref[valid]).max()


def _hf_logits(hf, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf, folder = _hf_model(name, tmp_path)
    model, tokenizer = load_pretrained(folder)
    assert tokenizer is not None and len(tokenizer) == VOCAB
    ids, mask = _padded_batch()
    ours = np.asarray(model(ids, attention_mask=mask))
    assert ours.shape == (3, 12, VOCAB) and ours.dtype == np.float32
    assert _relative_error(ours, _hf_logits(hf, ids, mask), mask) < 1e-4


@pytest.mark.parametrize("name", ["llama3_gqa_tied", "qwen2_bias_untied"])
def test_save_pretrained_round_trip_in_transformers(name, tmp_path):
    _, folder = _hf_model(name, tmp_path)
    model, tokenizer = load_pretrained(folder)
    out = save_pretrained(model, tokenizer, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert transformers.AutoTokenizer.from_pretrained(out).encode("12 + 7") == tokenizer.encode("12 + 7")
    ids, mask = _padded_batch()
    ours = np.asarray(model(ids, attention_mask=mask))
    assert _relative_error(ours, _hf_logits(reloaded, ids, mask), mask) < 1e-4
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


def test_left_padding_does_not_change_logits(tmp_path):
    _, folder = _hf_model("llama3_gqa_tied", tmp_path)
    model, _ = load_pretrained(folder)
    ids, mask = _padded_batch()
    row = ids[1:2, 4:]
    alone = np.asarray(model(row))
    padded = np.asarray(model(ids[1:2], attention_mask=mask[1:2]))[:, 4:]
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_prefill_on_a_cache_matches_transformers(name, tmp_path):
    """The search's prefill pattern: rows' first 5 tokens into a cache, then their other 7 (padded in three
    ways) on top of it with only the real tokens packed for the matmuls. Logits at the real tokens equal
    transformers' on the whole rows and the unpacked prefill's; a capacity too small leaves the last ones out."""
    hf, folder = _hf_model(name, tmp_path)
    model, _ = load_pretrained(folder)
    ids, mask = _padded_batch()
    cache = KVCache.init(model.config, 3, 12)
    _, cache = model(jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]), cache=cache)
    rest, rest_mask = jnp.asarray(ids[:, 5:]), jnp.asarray(mask[:, 5:])
    real = int(rest_mask.sum())
    unpacked, unpacked_cache = model(rest, rest_mask, cache=cache)
    packed, packed_cache = model(rest, rest_mask, cache=cache, packing=Packing.of(rest_mask, real + 3))
    ref = _hf_logits(hf, ids, mask)[:, 5:]
    assert _relative_error(np.asarray(packed), ref, mask[:, 5:]) < 1e-4
    valid = mask[:, 5:].astype(bool)
    np.testing.assert_allclose(np.asarray(packed)[valid], np.asarray(unpacked)[valid], rtol=1e-5, atol=1e-5)
    key_mask = np.asarray(unpacked_cache.mask)[None, :, None, :, None]
    np.testing.assert_allclose(np.asarray(packed_cache.k) * key_mask, np.asarray(unpacked_cache.k) * key_mask,
                               rtol=1e-5, atol=1e-5)
    short, _ = model(rest, rest_mask, cache=cache, packing=Packing.of(rest_mask, real - 2))
    np.testing.assert_allclose(np.asarray(short)[valid][:-2], np.asarray(unpacked)[valid][:-2], rtol=1e-5,
                               atol=1e-5)


def _prompts_and_tails():
    """Two left-padded prompts (4 and 8 real tokens) [2, 8], their mask, and three tokens [4, 3] for each of two
    samples per prompt (row 2p + i: sample i of prompt p)."""
    ids, mask = _padded_batch()
    tails = np.random.default_rng(1).integers(4, VOCAB, size=(4, 3)).astype(np.int32)
    return ids[1:, :8], mask[1:, :8], tails


def _prefill_and_decode(model, dtype=jnp.float32, rows=None):
    """Logits [4, 4, V]: the prompts' prefill (its last position, for both samples) into a read-only prefix cache,
    then three decode steps of the tails on top of it, each row with its own cache (the search's pattern).

    `rows` (sample rows, e.g. [3, 0]): decode only those, each in its slot of the prompts' samples
    (`PrefixGrid`, as a decode that dropped its finished rows does); logits [len(rows), 4, V].
    """
    prompts, prompt_mask, tails = _prompts_and_tails()
    prefix = KVCache.init(model.config, 2, 8, dtype=dtype)
    first, prefix = model(jnp.asarray(prompts), jnp.asarray(prompt_mask), cache=prefix)
    grid = None if rows is None else PrefixGrid.of(jnp.asarray(rows), 2, 2)
    rows = np.arange(4) if rows is None else np.asarray(rows)
    own = KVCache.init(model.config, len(rows), 3, dtype=dtype)
    steps = [jnp.repeat(first[:, -1], 2, axis=0)[rows]]
    for step in range(3):
        logits, own = model(jnp.asarray(tails[rows, step:step + 1]), cache=own, prefix=prefix, prefix_grid=grid)
        steps.append(logits[:, 0])
    return np.stack([np.asarray(s, np.float32) for s in steps], axis=1)


@pytest.mark.parametrize("name", ["llama3_gqa_tied", "mistral_window"])
def test_shared_prefix_decoding_matches_transformers(name, tmp_path):
    """Two samples continue each left-padded prompt from one read-only prefix cache; their logits equal
    transformers' on the concatenated rows (the sliding window counts tokens across the prefix's padding)."""
    hf, folder = _hf_model(name, tmp_path)
    model, _ = load_pretrained(folder)
    ours = _prefill_and_decode(model)[:, 1:]
    prompts, prompt_mask, tails = _prompts_and_tails()
    full_ids = np.concatenate([np.repeat(prompts, 2, axis=0), tails], axis=1)
    full_mask = np.concatenate([np.repeat(prompt_mask, 2, axis=0), np.ones_like(tails)], axis=1)
    ref = _hf_logits(hf, full_ids, full_mask)[:, 8:]
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["llama3_gqa_tied", "mistral_window"])
def test_prefix_grid_decodes_some_rows_as_in_the_full_batch(name, tmp_path):
    """Rows 3 and 0 alone, each in its slot among the two prompts' two samples (a decode that dropped its
    finished rows), read the shared prefix and get the logits they get in the full batch."""
    _, folder = _hf_model(name, tmp_path)
    model, _ = load_pretrained(folder)
    full = _prefill_and_decode(model)
    rows = [3, 0]
    np.testing.assert_allclose(_prefill_and_decode(model, rows=rows), full[rows], rtol=1e-5, atol=1e-5)


def test_bfloat16_model_decodes_close_to_float32(tmp_path):
    """bfloat16 weights and compute (projections accumulate in float32) through the search's prefill and
    shared-prefix decode: it compiles on XLA:CPU and its logits are close to float32's."""
    _, folder = _hf_model("llama3_gqa_tied", tmp_path)
    model, _ = load_pretrained(folder)
    half, _ = load_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ref, ours = _prefill_and_decode(model), _prefill_and_decode(half, jnp.bfloat16)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.05


def test_shared_prefix_needs_a_batch_that_is_a_multiple_of_it(tmp_path):
    _, folder = _hf_model("llama3_gqa_tied", tmp_path)
    model, _ = load_pretrained(folder)
    prefix = KVCache.init(model.config, 2, 8)
    with pytest.raises(ValueError, match="shared prefix of 2 rows"):
        model(jnp.ones((3, 1), jnp.int32), cache=KVCache.init(model.config, 3, 2), prefix=prefix)
    grid = PrefixGrid.of(jnp.arange(3), 3, 1)
    with pytest.raises(ValueError, match="prefix grid of 3 prefix rows"):
        model(jnp.ones((3, 1), jnp.int32), cache=KVCache.init(model.config, 3, 2), prefix=prefix, prefix_grid=grid)
