"""Jitted batched generation with a KV cache, sampling filters and stop strings."""

from jaxreason.sampling.generate import GenerateOutput, SamplingConfig, generate, sample, sample_logits
from jaxreason.sampling.prompts import decode_completions, encode_prompts, eos_ids, pad_left, pad_token_id, prompt_ids
from jaxreason.sampling.stopping import StopTable, build_stop_table

__all__ = [
    "GenerateOutput",
    "SamplingConfig",
    "StopTable",
    "build_stop_table",
    "decode_completions",
    "encode_prompts",
    "eos_ids",
    "generate",
    "pad_left",
    "pad_token_id",
    "prompt_ids",
    "sample",
    "sample_logits",
]
