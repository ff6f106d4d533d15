"""The clipped-ratio policy-gradient loss with a token-level KL penalty, and its train-step objective.

Every per-token array of an RL batch is [R, T] and lies on the *target* position, as `loss_mask` does in
`jaxreason.train.losses`: entry t belongs to token t, which the logits at t - 1 predict.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreason.train.losses import Mask, Metrics, token_logprobs

AGGREGATIONS = ("token_mean", "sequence_mean")


def clipped_policy_loss(
    logprobs: Float[Array, "R L"],
    old_logprobs: Float[Array, "R L"],
    ref_logprobs: Float[Array, "R L"],
    advantages: Float[Array, "R L"],
    mask: Mask,
    kl_coefs: Float[Array, "R L"],
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
) -> tuple[Float[Array, ""], Metrics]:
    """PPO's clipped surrogate (as GRPO uses it) plus a per-token KL penalty to a reference policy.

    Per trained token (mask 1), with rho = exp(logprobs - old_logprobs) and d = ref_logprobs - logprobs:

      pg   = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)
      kl   = exp(d) - d - 1          (k3: non-negative, unbiased for KL(pi || ref) on tokens sampled from pi)
      loss = aggregate(pg + kl_coef kl)

    aggregate "token_mean" averages over every trained token of the batch (long answers weigh more, DAPO);
    "sequence_mean" averages within each row, then over rows (GRPO's 1/|o_i| sum). eps_high defaults to eps.
    Per-token `kl_coefs` let multi-turn episodes weigh each attempt's KL (SCoRe). Metrics: loss, pg_loss, kl,
    clip_fraction (trained tokens whose ratio was clipped in the direction that matters), ratio,
    num_tokens (token_mean only: the train step weighs micro-batches by it).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.astype(jnp.float32)
    logprobs = logprobs.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    ratio = jnp.exp(logprobs - jax.lax.stop_gradient(old_logprobs))
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    pg = -jnp.minimum(ratio * advantages, clipped * advantages)
    d = jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32)) - logprobs
    kl = jnp.exp(d) - d - 1.0
    per_token = pg + kl_coefs * kl

    tokens = jnp.sum(mask)
    token_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(tokens, 1.0)
    if aggregation == "token_mean":
        loss = token_mean(per_token)
    else:
        row_tokens = jnp.sum(mask, axis=-1)
        rows = jnp.sum(row_tokens > 0)
        loss = jnp.sum(jnp.sum(per_token * mask, axis=-1) / jnp.maximum(row_tokens, 1.0)) / jnp.maximum(rows, 1.0)
    was_clipped = (ratio * advantages) > (clipped * advantages)
    metrics = {"loss": loss, "pg_loss": token_mean(pg), "kl": token_mean(kl),
               "clip_fraction": token_mean(was_clipped), "ratio": token_mean(ratio)}
    if aggregation == "token_mean":
        metrics["num_tokens"] = tokens
    return loss, metrics


def sequence_token_logprobs(model, tokens, attention_mask) -> Float[Array, "R T"]:
    """log p(tokens[:, t] | tokens[:, :t]) at every position t >= 1 (0 at t = 0), in float32."""
    logp = token_logprobs(model(tokens, attention_mask), tokens)
    return jnp.pad(logp, ((0, 0), (1, 0)))


@functools.cache  # one function per setting: train steps built with it share a compiled program
def policy_gradient_objective(clip_eps: float = 0.2, clip_eps_high: float | None = None,
                              aggregation: str = "token_mean"):
    """`(model, batch, key) -> (loss, metrics)` for `make_train_step`. batch [R, T]: tokens, attention_mask,
    loss_mask, advantages, ref_logprobs, kl_coefs and, unless the update is exactly on-policy, old_logprobs
    (per-token arrays on target positions). Without old_logprobs the ratio is pi / stop_gradient(pi) = 1, whose
    gradient is the plain policy gradient."""

    def objective(model, batch, key):
        del key
        logp = sequence_token_logprobs(model, batch["tokens"], batch["attention_mask"])[:, 1:]
        cut = lambda name: batch[name][:, 1:]
        old = cut("old_logprobs") if "old_logprobs" in batch else logp
        return clipped_policy_loss(logp, old, cut("ref_logprobs"), cut("advantages"),
                                   cut("loss_mask"), cut("kl_coefs"), clip_eps=clip_eps,
                                   clip_eps_high=clip_eps_high, aggregation=aggregation)

    return objective
