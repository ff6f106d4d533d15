"""Copies of a model's weights for the outer loops: a start to train several models from, and fresh modules on it.

Training donates (and so deletes) the live buffers of the model it trains; a snapshot lives in its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason.models.lora import LoRAParam, add_lora
from jaxreason.models.value_head import HEAD_PARAMETERS, ValueModel
from jaxreason.train.sft import LoRAConfig
from jaxreason.verifiers.dpo import DPOVerifier


def snapshot(module: nnx.Module) -> nnx.State:
    """A copy of the module's state in fresh buffers."""
    return jax.tree.map(jnp.copy, nnx.state(module))


def copy_of(model: nnx.Module, state: nnx.State) -> nnx.Module:
    """A new module with `model`'s structure and a fresh copy of `state`."""
    return nnx.merge(nnx.graphdef(model), jax.tree.map(jnp.copy, state))


def lm_copy(policy: nnx.Module, state: nnx.State, seed: int, lora: LoRAConfig | None = None) -> nnx.Module:
    """A language model (a generative verifier, a DPO verifier) on its own copy of `state`, a snapshot of `policy`;
    with `lora`, adapters drawn from `seed` on its kernels (train them alone: `lm_parameters(lora=True)`)."""
    model = copy_of(policy, state)
    if lora is not None:
        add_lora(model, lora.rank, lora.alpha, targets=lora.targets, rngs=nnx.Rngs(seed))
    return model


def lm_parameters(lora: bool = False) -> nnx.filterlib.Filter:
    """What training a language model of `lm_copy` updates: every parameter, or its LoRA adapters alone."""
    return LoRAParam if lora else nnx.Param


def dpo_verifier_from(policy: nnx.Module, state: nnx.State, beta: float, seed: int,
                      lora: LoRAConfig | None = None) -> DPOVerifier:
    """A DPO verifier whose pi_V and pi_ref start as `state` (a snapshot of `policy`): two copies, or with `lora`
    one copy with adapters, whose reference is the same model with them off (no second copy)."""
    model = lm_copy(policy, state, seed, lora)
    return DPOVerifier(model, copy_of(policy, state) if lora is None else None, beta)


def value_model_from(policy: nnx.Module, seed: int, state: nnx.State | None = None,
                     likelihood: bool = False, lora: LoRAConfig | None = None) -> ValueModel:
    """A value model (PRM, ORM, reward model) on its own copy of `policy`'s backbone, with the weights `policy`
    holds now or those of `state` (a snapshot of it); the head is new, drawn from `seed`. It computes in the
    policy's dtype and rematerialises as the policy does (the model config's `dtype` and `remat`). With
    `likelihood` it also reads the LM's solution likelihood (`ValueModel`), its LM head a copy of the policy's;
    with `lora`, adapters sit on its backbone's kernels (train them with `value_parameters(lora=True)`)."""
    backbone = policy.transformer
    model = ValueModel(policy.config, dtype=backbone.dtype, param_dtype=backbone.embed[...].dtype,
                       remat=backbone.remat, likelihood=likelihood, rngs=nnx.Rngs(seed))
    source = policy if state is None else copy_of(policy, state)  # copy_of copies already
    copy = snapshot if state is None else nnx.state
    nnx.update(model.transformer, copy(source.transformer))
    if likelihood and not policy.config.tie_word_embeddings:
        model.lm_head[...] = jnp.copy(source.lm_head[...])
    if lora is not None:
        add_lora(model, lora.rank, lora.alpha, targets=lora.targets, rngs=nnx.Rngs(seed + 1))
    return model


def value_parameters(train_backbone: bool = True, lora: bool = False) -> nnx.filterlib.Filter:
    """What training a value model updates: every parameter; with LoRA adapters, them and the head (the base
    weights stay); without the backbone, the head alone (`HEAD_PARAMETERS`)."""
    if lora and not train_backbone:
        raise ValueError("a value model either trains its head alone or its head and LoRA adapters, not both: "
                         "drop the LoRA config or train the backbone")
    if lora:
        return nnx.Any(LoRAParam, HEAD_PARAMETERS)
    return nnx.Param if train_backbone else HEAD_PARAMETERS
