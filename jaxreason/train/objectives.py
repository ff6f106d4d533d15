"""Objectives `(model, batch) -> (loss, metrics)` that connect models to the pure losses."""

from __future__ import annotations

import jax

from jaxreason.train import losses


def sft_objective(model, batch: dict[str, jax.Array]):
    """Next-token cross-entropy on completion tokens. batch: tokens, attention_mask, loss_mask [B, T]."""
    logits = model(batch["tokens"], batch["attention_mask"])
    return losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])


def value_objective(kind: str = "mse"):
    """PRM regression at step ends. batch: tokens, attention_mask, value_targets, value_mask [B, T]."""

    def objective(model, batch):
        value_logits = model(batch["tokens"], batch["attention_mask"])
        return losses.value_loss(value_logits, batch["value_targets"], batch["value_mask"], kind=kind)

    return objective
