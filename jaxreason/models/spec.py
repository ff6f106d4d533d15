"""Which model a run uses: a pretrained one (preset, folder, GGUF) or a small one trained from scratch."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.config import ModelConfig
from jaxreason.models.llama import CausalLM
from jaxreason.models.pretrained import load_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ScratchModel:
    """A Llama-shaped model with random weights and the built-in character tokenizer."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    pretrained: str | None = None  # a preset name, a Hugging Face folder or a .gguf file
    scratch: ScratchModel | None = None
    dtype: str = "float32"  # compute dtype; parameters stay float32 (master weights)
    remat: bool = False  # recompute layer activations in the backward pass

    def __post_init__(self):
        if (self.pretrained is None) == (self.scratch is None):
            raise ValueError("model: set exactly one of `pretrained` and `scratch`")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def build_model(spec: ModelSpec, seed: int = 0) -> tuple[CausalLM, object]:
    """(model, tokenizer) for a spec; scratch models are initialised from `seed`."""
    dtype = DTYPES[spec.dtype]
    if spec.pretrained is not None:
        model, tokenizer = load_pretrained(spec.pretrained, dtype=dtype)
        model.transformer.remat = spec.remat
        return model, tokenizer
    tokenizer = build_char_tokenizer()
    s = spec.scratch
    config = ModelConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_layers=s.num_layers, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
        max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CausalLM(config, dtype=dtype, remat=spec.remat, rngs=nnx.Rngs(seed)), tokenizer
