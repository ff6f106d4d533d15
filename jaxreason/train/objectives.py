"""Objectives `(model, batch, key) -> (loss, metrics)` that connect models to the pure losses.

`key` is a fresh PRNG key per step (per micro-batch under accumulation) for objectives that sample or use
dropout. A loss that is a mean over tokens reports their count as `num_tokens`, which the train step uses to
weight micro-batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxreason.train import losses


def sft_objective(model, batch: dict[str, jax.Array], key: jax.Array):
    """Next-token cross-entropy on completion tokens. batch: tokens, attention_mask, loss_mask [B, T]."""
    del key  # deterministic
    logits = model(batch["tokens"], batch["attention_mask"])
    return losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])


@functools.cache  # one function per kind: train steps built with it share a compiled program
def value_objective(kind: str = "mse"):
    """PRM regression at step ends. batch: tokens, attention_mask, value_targets, value_mask [B, T]."""

    def objective(model, batch, key):
        del key  # deterministic
        value_logits = model(batch["tokens"], batch["attention_mask"])
        loss, metrics = losses.value_loss(value_logits, batch["value_targets"], batch["value_mask"], kind=kind)
        return loss, {**metrics, "num_tokens": jnp.sum(batch["value_mask"].astype(jnp.float32))}

    return objective
