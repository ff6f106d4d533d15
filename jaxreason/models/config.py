"""Model configuration for the Llama-family decoder, convertible to and from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

# Hugging Face architectures this decoder implements exactly, and the model_type each one writes.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3` in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v only.
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included).
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; jaxreason implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        """Builds a config from a Hugging Face `config.json` dict; `source` names it in errors."""
        architectures = hf.get("architectures") or []
        architecture = architectures[0] if architectures else _ARCH_BY_MODEL_TYPE.get(hf.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            found = architecture or hf.get("model_type")
            raise ValueError(
                f"{source}: unsupported architecture {found!r}; jaxreason implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        try:
            return cls._from_hf(hf, architecture, source)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], architecture: str, source: str) -> ModelConfig:
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", architecture == "Qwen2ForCausalLM"),
            sliding_window=_sliding_window(hf, architecture),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict that transformers loads into the same model."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.architecture == "LlamaForCausalLM":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        if self.architecture == "Qwen2ForCausalLM":
            hf["use_sliding_window"] = False
        return hf


_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`; older configs keep it at the top level.
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; jaxreason implements 'llama3'")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _sliding_window(hf: dict[str, Any], architecture: str) -> int | None:
    if architecture == "MistralForCausalLM":
        return hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        # Qwen2 windows only some layers (max_window_layers); no released Qwen2/2.5 checkpoint enables it.
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")
    return None
