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


@functools.cache  # one function per setting: train steps built with it share a compiled program
def value_objective(kind: str = "mse", lm_weight: float = 0.0):
    """PRM regression at step ends. batch: tokens, attention_mask, value_targets, value_mask [B, T].

    A model that reads its LM's likelihood (`ValueModel(likelihood=True)`) needs batch["solution_start"] [B]
    (`value_batch` gives it). `lm_weight` > 0 adds that times next-token cross-entropy on batch["lm_mask"] (the
    correct solutions' tokens): the regression alone moves the backbone away from the language model that the
    likelihood comes from."""

    def objective(model, batch, key):
        del key  # deterministic
        start = batch.get("solution_start")
        if lm_weight:
            value_logits, lm_logits = model.logits_and_lm_logits(batch["tokens"], batch["attention_mask"], start)
        else:
            value_logits = model(batch["tokens"], batch["attention_mask"], solution_start=start)
        loss, metrics = losses.value_loss(value_logits, batch["value_targets"], batch["value_mask"], kind=kind)
        if lm_weight:
            lm_loss, _ = losses.sft_loss(lm_logits, batch["tokens"], batch["lm_mask"])
            metrics = {**metrics, "value_loss": loss, "lm_loss": lm_loss}
            loss = loss + lm_weight * lm_loss
            metrics["loss"] = loss
        return loss, {**metrics, "num_tokens": jnp.sum(batch["value_mask"].astype(jnp.float32))}

    return objective


@functools.cache  # one function per setting: train steps built with it share a compiled program
def dpo_objective(beta: float, label_smoothing: float = 0.0):
    """DPO on (chosen, rejected) pairs against precomputed reference log-probs (`losses.dpo_loss`). batch:
    chosen_tokens, chosen_attention_mask, chosen_loss_mask, the same three for rejected [B, T], and ref_chosen,
    ref_rejected [B] (log pi_ref of each completion, `losses.sequence_logprob`)."""

    def objective(model, batch, key):
        del key  # deterministic
        both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in
                ("tokens", "attention_mask", "loss_mask")}
        logp = losses.sequence_logprob(model(both["tokens"], both["attention_mask"]), both["tokens"],
                                       both["loss_mask"])
        chosen, rejected = jnp.split(logp, 2)
        return losses.dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta, label_smoothing)

    return objective


@functools.cache  # one function per setting: train steps built with it share a compiled program
def generative_verifier_objective(yes_id: int, no_id: int, sft_weight: float):
    """GenRM's objective (Zhang et al. 2024, eq. 2 with the CoT term): the verdict's cross-entropy on the verification
    rows, plus next-token cross-entropy on their rationale tokens (CoT), plus `sft_weight` (lambda) times that on
    the correct solutions of the solution rows. batch (`jaxreason.verifiers.generative_data.verification_batch`):
    tokens, attention_mask, rationale_mask, solution_mask [B, T]; verdict_position [B] (0 on a solution row),
    label [B]."""

    def objective(model, batch, key):
        del key  # deterministic
        logits = model(batch["tokens"], batch["attention_mask"])
        verdict, verdict_metrics = losses.verdict_loss(logits, batch["tokens"], batch["verdict_position"], yes_id,
                                                       no_id, batch["label"], rows=batch["verdict_position"] > 0)
        rationale, _ = losses.sft_loss(logits, batch["tokens"], batch["rationale_mask"])
        solution, _ = losses.sft_loss(logits, batch["tokens"], batch["solution_mask"])
        loss = verdict + rationale + sft_weight * solution
        return loss, {"loss": loss, "verdict_loss": verdict, "verdict_accuracy": verdict_metrics["accuracy"],
                      "rationale_loss": rationale, "solution_loss": solution}

    return objective


def bradley_terry_objective(model, batch: dict[str, jax.Array], key: jax.Array):
    """A reward model's pairwise objective (`losses.bradley_terry_loss`) on the value head's logit at each
    solution's last token, where `ValueVerifier` reads its score. batch (`preference_pairs.pair_batch`):
    chosen_tokens, chosen_attention_mask, rejected_tokens, rejected_attention_mask [B, T], right-padded."""
    del key  # deterministic
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    scores = jnp.take_along_axis(model(tokens, mask), last[:, None], axis=1)[:, 0]
    chosen, rejected = jnp.split(scores, 2)
    return losses.bradley_terry_loss(chosen, rejected)
