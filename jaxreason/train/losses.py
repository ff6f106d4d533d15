"""Pure training losses: arrays in, `(loss, metrics)` out.

The train step calls the model and hands its logits (or values, or log-probs) to one of these functions,
so every loss is plain `jax.numpy`, jittable and free of modules. Losses are scalar float32; metrics are a
flat dict of float32 scalars. Masks may be bool or int; a mask of 1 marks a position that counts.

Alignment convention: `tokens[:, t + 1]` is predicted by `logits[:, t]`, and a `loss_mask` lies on the
*target* position, so the mask of the prediction made at `t` is `loss_mask[:, t + 1]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

Metrics = dict[str, Float[Array, ""]]
Mask = Int[Array, "B T"] | Bool[Array, "B T"]


def _masked_mean(x: Array, mask: Array) -> Float[Array, ""]:
    """Mean of x over mask; 0 (not NaN) when the mask is empty."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------------- next-token likelihood


def token_logprobs(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> Float[Array, "B T-1"]:
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) for t = 0 .. T-2, in float32.

    The targets are shifted, not the logits: slicing [B, T, V] logits to T-1 positions copies them (and their
    gradient) whole, about a tenth of a SmolLM2 SFT step on CPU; the last position's value is dropped instead."""
    logits = logits.astype(jnp.float32)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (picked - jax.nn.logsumexp(logits, axis=-1))[:, :-1]


def sft_loss(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], loss_mask: Mask
) -> tuple[Float[Array, ""], Metrics]:
    """Next-token cross-entropy averaged over every masked target token of the batch (not per row).

    loss_mask [B, T] is 1 on completion tokens and 0 on prompt and padding. Metrics: loss, num_tokens,
    accuracy (argmax prediction == target, over the masked tokens).
    """
    mask = loss_mask[:, 1:]
    loss = _masked_mean(-token_logprobs(logits, tokens), mask)
    correct = jnp.argmax(logits, axis=-1)[:, :-1] == tokens[:, 1:]
    metrics = {
        "loss": loss,
        "num_tokens": jnp.sum(mask.astype(jnp.float32)),
        "accuracy": _masked_mean(correct, mask),
    }
    return loss, metrics


def sequence_logprob(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], loss_mask: Mask
) -> Float[Array, " B"]:
    """Sum of the log-probs of each row's completion tokens (loss_mask 1): log pi(completion | prompt)."""
    return jnp.sum(token_logprobs(logits, tokens) * loss_mask[:, 1:].astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------- process reward model


def value_loss(
    value_logits: Float[Array, "B T"],
    targets: Float[Array, "B T"],
    target_mask: Mask,
    kind: str = "mse",
) -> tuple[Float[Array, ""], Metrics]:
    """PRM value regression at step-end positions (target_mask 1), soft targets in [0, 1].

    kind "mse": squared error between sigmoid(value_logits) and the targets (ReST-MCTS* regresses values);
    kind "bce": binary cross-entropy with soft labels, computed from the logits. Metrics: loss, mae (of the
    sigmoid values). Averaged over all masked positions of the batch.
    """
    value_logits = value_logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    values = jax.nn.sigmoid(value_logits)
    if kind == "mse":
        per_position = jnp.square(values - targets)
    elif kind == "bce":
        per_position = optax.sigmoid_binary_cross_entropy(value_logits, targets)
    else:
        raise ValueError(f"unknown value loss kind {kind!r}; expected 'mse' or 'bce'")
    loss = _masked_mean(per_position, target_mask)
    return loss, {"loss": loss, "mae": _masked_mean(jnp.abs(values - targets), target_mask)}


# ---------------------------------------------------------------- preference losses


def dpo_loss(
    policy_chosen: Float[Array, " B"],
    policy_rejected: Float[Array, " B"],
    ref_chosen: Float[Array, " B"],
    ref_rejected: Float[Array, " B"],
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, ""], Metrics]:
    """Direct preference optimisation on sequence log-probs (see `sequence_logprob`).

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) and ls = label_smoothing,
    loss = mean(-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)): the conservative DPO of
    Mitchell (2023), which assumes a fraction ls of the preference labels is flipped; ls = 0 is plain DPO.
    Metrics: loss, chosen_reward, rejected_reward (means of beta (policy - ref)), reward_margin (their mean
    difference), reward_accuracy (fraction of pairs whose chosen reward is higher).
    """
    chosen_reward = beta * (policy_chosen - ref_chosen).astype(jnp.float32)
    rejected_reward = beta * (policy_rejected - ref_rejected).astype(jnp.float32)
    margin = chosen_reward - rejected_reward  # = beta * h
    # log-likelihood of the pair under the stated label and under the flipped one
    agree, flipped = jax.nn.log_sigmoid(margin), jax.nn.log_sigmoid(-margin)
    loss = -jnp.mean((1.0 - label_smoothing) * agree + label_smoothing * flipped)
    metrics = {
        "loss": loss,
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(margin),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
    }
    return loss, metrics


def dpo_score(
    policy_logprob: Float[Array, " B"], ref_logprob: Float[Array, " B"], beta: float
) -> Float[Array, " B"]:
    """The implicit DPO reward beta (log pi - log pi_ref): how a V-STaR verifier ranks candidate solutions."""
    return beta * (policy_logprob - ref_logprob).astype(jnp.float32)


def bradley_terry_loss(
    chosen_scores: Float[Array, " B"], rejected_scores: Float[Array, " B"]
) -> tuple[Float[Array, ""], Metrics]:
    """Reward-model pairwise loss mean(-log sigmoid(chosen - rejected)). Metrics: loss, accuracy."""
    diff = (chosen_scores - rejected_scores).astype(jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(diff))
    return loss, {"loss": loss, "accuracy": jnp.mean((diff > 0).astype(jnp.float32))}


# ---------------------------------------------------------------- multi-turn RL (SCoRe)


def multi_turn_pg_loss(
    token_logprobs: Float[Array, "N S L"],
    ref_token_logprobs: Float[Array, "N S L"],
    token_turn: Int[Array, "N S L"],
    turn_rewards: Float[Array, "N S J"],
    kl_coefs: tuple[float, ...],
    bonus_alpha: float = 0.0,
) -> tuple[Float[Array, ""], Metrics]:
    """REINFORCE with a leave-one-out baseline and a per-turn KL penalty, for J-attempt episodes.

    N prompts, S >= 2 sampled episodes per prompt, L tokens per episode, J turns (attempts).
    token_turn holds the turn 0..J-1 that generated each token, or -1 for tokens that are not trained
    (prompt, feedback/instruction between attempts, padding). Per episode (all terms undiscounted):

      shaped r_j = r_j for j < J-1;  shaped r_{J-1} = r_{J-1} + alpha (r_{J-1} - r_{J-2})  (J >= 2)
      G_j      = sum_{k >= j} shaped r_k                       (reward-to-go of turn j)
      b_{n,s,j} = mean_{s' != s} G_{n,s',j}                    (leave-one-out baseline over the S samples)
      A_{n,s,j} = stop_gradient(G_{n,s,j} - b_{n,s,j})
      pg  = -mean over trained tokens of A_{turn(token)} * logp(token)
      kl  =  mean over trained tokens of kl_coefs[turn(token)] * (exp(ref - logp) - (ref - logp) - 1)
      loss = pg + kl

    The KL term uses the k3 estimator: non-negative and unbiased for KL(pi || ref) on tokens sampled from pi.
    SCoRe Stage I: zero the turn-0 rewards and use a large kl_coefs[0] (keep attempt 1 at the base model) and
    a small kl_coefs[1]; Stage II: both rewards, equal small coefficients and bonus_alpha > 0.
    Metrics: loss, pg_loss, kl_loss, kl_turn{j} (mean k3 over turn-j tokens, before the coefficient),
    reward_turn{j} (mean unshaped reward), advantage_abs (mean |A|).
    """
    num_samples, num_turns = turn_rewards.shape[1], turn_rewards.shape[2]
    if num_samples < 2:
        raise ValueError(f"the leave-one-out baseline needs S >= 2 samples per prompt, got {num_samples}")
    if len(kl_coefs) != num_turns:
        raise ValueError(f"kl_coefs has {len(kl_coefs)} entries for {num_turns} turns")

    rewards = jnp.asarray(turn_rewards, jnp.float32)
    shaped = rewards
    if num_turns >= 2:  # a zero alpha adds nothing, so no branch on a possibly traced value
        shaped = shaped.at[..., -1].add(bonus_alpha * (rewards[..., -1] - rewards[..., -2]))
    returns = jnp.cumsum(shaped[..., ::-1], axis=-1)[..., ::-1]
    baseline = (jnp.sum(returns, axis=1, keepdims=True) - returns) / (num_samples - 1)
    advantages = jax.lax.stop_gradient(returns - baseline)

    trained = token_turn >= 0
    turn = jnp.maximum(token_turn, 0)  # untrained tokens read turn 0 and are then masked out
    logp = token_logprobs.astype(jnp.float32)
    pg_loss = -_masked_mean(jnp.take_along_axis(advantages, turn, axis=-1) * logp, trained)

    delta = jax.lax.stop_gradient(ref_token_logprobs.astype(jnp.float32)) - logp
    k3 = jnp.exp(delta) - delta - 1.0
    coefs = jnp.asarray(kl_coefs, jnp.float32)[turn]
    kl_loss = _masked_mean(coefs * k3, trained)

    loss = pg_loss + kl_loss
    metrics = {"loss": loss, "pg_loss": pg_loss, "kl_loss": kl_loss}
    for j in range(num_turns):
        metrics[f"kl_turn{j}"] = _masked_mean(k3, token_turn == j)
        metrics[f"reward_turn{j}"] = jnp.mean(rewards[..., j])
    metrics["advantage_abs"] = jnp.mean(jnp.abs(advantages))
    return loss, metrics


# ---------------------------------------------------------------- generative verifier


def _verdict_logprobs(
    logits: Float[Array, "B T V"], verdict_position: Int[Array, " B"]
) -> Float[Array, "B V"]:
    """Log-softmax of the logits that predict the verdict token (those at verdict_position - 1)."""
    index = (verdict_position - 1)[:, None, None]
    return jax.nn.log_softmax(jnp.take_along_axis(logits, index, axis=1)[:, 0].astype(jnp.float32), axis=-1)


def verdict_loss(
    logits: Float[Array, "B T V"],
    tokens: Int[Array, "B T"],
    verdict_position: Int[Array, " B"],
    yes_id: int,
    no_id: int,
    labels: Bool[Array, " B"],
    rows: Bool[Array, " B"] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Generative-verifier loss: next-token cross-entropy of the correct verdict token.

    Each row is prompt, solution, optional rationale, then the verdict token at
    `tokens[b, verdict_position[b]]` (verdict_position >= 1), predicted by `logits[b, verdict_position[b] - 1]`.
    The target is yes_id for a correct solution (label True) and no_id otherwise, scored with a
    full-vocabulary softmax. Rationale tokens are trained separately with `sft_loss`. `tokens` is the
    sequence the logits were computed from; the target comes from the labels, so a row may hold either
    verdict token. `rows` [B] (default: all) are the rows that hold a verdict; the means run over them (0 when
    none does). Metrics: loss, accuracy (P(Yes) > P(No) agrees with the label).
    """
    del tokens  # the verdict target is fixed by the label, not by the token in the sequence
    rows = jnp.ones(labels.shape, bool) if rows is None else rows
    logp = _verdict_logprobs(logits, jnp.maximum(verdict_position, 1))
    target = jnp.where(labels, yes_id, no_id)
    loss = _masked_mean(-jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0], rows)
    says_yes = logp[:, yes_id] > logp[:, no_id]
    return loss, {"loss": loss, "accuracy": _masked_mean(says_yes == labels, rows)}


def p_yes(
    logits: Float[Array, "B T V"], verdict_position: Int[Array, " B"], yes_id: int
) -> Float[Array, " B"]:
    """P(Yes) under the full softmax at the verdict slot: the generative verifier's score of a solution."""
    return jnp.exp(_verdict_logprobs(logits, verdict_position)[:, yes_id])
