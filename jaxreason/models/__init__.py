"""Llama-family NNX models, value heads, and Hugging Face / GGUF weights in and out."""

from jaxreason.models.config import ModelConfig, RopeScaling
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import CausalLM, Transformer
from jaxreason.models.pretrained import (
    PRESETS,
    load_pretrained,
    load_value_model,
    save_pretrained,
    save_value_model,
)
from jaxreason.models.value_head import ValueModel

__all__ = [
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "RopeScaling",
    "Transformer",
    "load_pretrained",
    "load_value_model",
    "save_pretrained",
    "save_value_model",
    "ValueModel",
]
