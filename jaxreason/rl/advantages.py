"""Advantage estimators for on-policy RL: arrays of rewards and values in, float32 advantages out.

Pure `jax.numpy`, jittable and free of modules, like `jaxreason.train.losses`. Two kinds:

- group estimators `(rewards [N, G]) -> [N, G]` over G sampled completions of each of N prompts (GRPO, Dr. GRPO,
  RLOO), named in configs through `get_advantage`;
- per-token estimators: `step_advantages` (per reasoning step from Monte Carlo prefix values), `gae` (from a
  learned critic), and `per_token`, which spreads per-sequence, per-step or per-turn values onto the tokens.

Per-token arrays follow the losses' alignment: index t is the token `tokens[:, t]`, the *target* of the
prediction made at t - 1, so an advantage lies where its `loss_mask` (or `token_turn`) lies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Mask = Int[Array, "B T"] | Bool[Array, "B T"]
GroupAdvantage = Callable[[Float[Array, "N G"]], Float[Array, "N G"]]


def _check_ndim(name: str, x: Array, ndim: int, dims: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be [{dims}], got shape {tuple(x.shape)}")


def _check_same_shape(name: str, x: Array, like_name: str, like: Array) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {like_name}'s {tuple(like.shape)}")


# ---------------------------------------------------------------- group estimators


def group_normalized(
    rewards: Float[Array, "N G"], *, scale_by_std: bool = True, eps: float = 1e-6
) -> Float[Array, "N G"]:
    """GRPO's group-relative advantage (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps).

    The mean and std run over the G completions of each prompt; std_g is the population standard deviation
    sqrt(mean_g (r - mean_g r)^2) (implementations that divide by G - 1 give sqrt((G - 1) / G) times these
    advantages). `scale_by_std=False` gives A_i = r_i - mean_g r (Dr. GRPO, Liu et al. 2025), which does not
    up-weight the prompts whose rewards barely vary. A group whose rewards are all equal gets exactly 0, also
    with eps = 0: it carries no learning signal, and its mean may round away from the rewards.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    _check_ndim("rewards", rewards, 2, "N, G")
    flat = jnp.all(rewards == rewards[:, :1], axis=-1, keepdims=True)
    centered = jnp.where(flat, 0.0, rewards - jnp.mean(rewards, axis=-1, keepdims=True))
    if not scale_by_std:
        return centered
    std = jnp.sqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True))
    return centered / (jnp.where(flat, 1.0, std) + eps)  # flat groups are 0 / (1 + eps) = 0, never 0 / 0


def leave_one_out(rewards: Float[Array, "N G"]) -> Float[Array, "N G"]:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = r_i - (sum_j r_j - r_i) / (G - 1).

    The baseline of each completion is the mean reward of the other G - 1 completions of its prompt, so it
    is independent of the completion and the estimate stays unbiased. Needs G >= 2.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    _check_ndim("rewards", rewards, 2, "N, G")
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError(f"leave_one_out needs G >= 2 rewards per group, got rewards of shape {rewards.shape}")
    others = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (group_size - 1)
    return rewards - others


ADVANTAGES: dict[str, GroupAdvantage] = {
    "grpo": group_normalized,
    "dr_grpo": functools.partial(group_normalized, scale_by_std=False),
    "rloo": leave_one_out,
}


def register_advantage(name: str, fn: GroupAdvantage) -> None:
    """Makes `get_advantage(name)` return `fn`, a group estimator `(rewards [N, G]) -> [N, G]`."""
    if name in ADVANTAGES and ADVANTAGES[name] is not fn:
        raise ValueError(f"advantage {name!r} is registered already")
    ADVANTAGES[name] = fn


def get_advantage(name: str) -> GroupAdvantage:
    """The group estimator a config names (`grpo`, `dr_grpo`, `rloo`, or one added by `register_advantage`)."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage {name!r} (known: {', '.join(sorted(ADVANTAGES))})")
    return ADVANTAGES[name]


# ---------------------------------------------------------------- per-step and per-token estimators


def step_advantages(
    prefix_values: Float[Array, "B S+1"], step_mask: Int[Array, "B S"] | Bool[Array, "B S"]
) -> Float[Array, "B S"]:
    """Per-step advantages from Monte Carlo values of prefixes (Setlur et al. 2024, "Rewarding progress").

    prefix_values[:, i] = Q(prefix_i): the estimated success of completing the solution from its first i steps,
    with prefix_values[:, 0] the prompt alone; step_mask [B, S] is 1 on the steps that exist. Step i (1-based)
    gets its progress A_i = Q(prefix_i) - Q(prefix_{i-1}), i.e. out[:, i - 1] = prefix_values[:, i] -
    prefix_values[:, i - 1]; 0 where step_mask is 0.
    """
    prefix_values = jnp.asarray(prefix_values, jnp.float32)
    _check_ndim("prefix_values", prefix_values, 2, "B, S+1")
    _check_ndim("step_mask", step_mask, 2, "B, S")
    batch, steps = step_mask.shape
    if prefix_values.shape != (batch, steps + 1):
        raise ValueError(f"prefix_values has shape {tuple(prefix_values.shape)}, expected {(batch, steps + 1)} "
                         f"(one more column than step_mask {tuple(step_mask.shape)}: the prompt's value first)")
    progress = prefix_values[:, 1:] - prefix_values[:, :-1]
    return jnp.where(step_mask.astype(bool), progress, 0.0)


def per_token(
    values: Float[Array, "B K"], segment: Int[Array, "B T"], fill: float = 0.0
) -> Float[Array, "B T"]:
    """Spreads per-segment values onto tokens: out[b, t] = values[b, segment[b, t]], or `fill` where segment < 0.

    A segment is whatever the values are per: the sequence (K = 1, segment 0 on the response tokens), a
    reasoning step (each token's step index), or a turn of a multi-turn episode (`token_turn`, -1 on the
    prompt, the instructions between attempts and padding). Segments must be < K.
    """
    values = jnp.asarray(values, jnp.float32)
    _check_ndim("values", values, 2, "B, K")
    _check_ndim("segment", segment, 2, "B, T")
    if values.shape[0] != segment.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but segment has {segment.shape[0]}")
    spread = jnp.take_along_axis(values, jnp.maximum(segment, 0), axis=1)  # segment < 0 reads 0, then masked
    return jnp.where(segment >= 0, spread, jnp.asarray(fill, jnp.float32))


def gae(
    rewards: Float[Array, "B T"],
    values: Float[Array, "B T"],
    mask: Mask,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked tokens of each row.

    values[:, t] = V_t is the critic's value of the state before token t is generated (see
    `jaxreason.rl.critic.critic_values`); rewards[:, t] is the reward for generating token t (typically the
    sequence reward on its last response token, 0 elsewhere). The recursion walks each row's masked tokens in
    reverse order and jumps over unmasked positions (e.g. an instruction between two attempts), so "next" is
    the next *masked* token; after the last one the episode ends and V_next = A_next = 0:

      delta_t = r_t + gamma V_next - V_t
      A_t     = delta_t + gamma lam A_next
      R_t     = A_t + V_t                   (the critic's regression target)

    lam = 0 gives A_t = delta_t and the TD(0) targets R_t = r_t + gamma V_next; lam = 1 gives the Monte Carlo
    returns R_t = sum_k gamma^k r_{t+k} over the masked tokens. Rewards at unmasked positions are ignored.
    Returns (advantages, returns), float32, 0 outside the mask.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    _check_ndim("rewards", rewards, 2, "B, T")
    _check_same_shape("values", values, "rewards", rewards)
    mask = jnp.asarray(mask)
    _check_same_shape("mask", mask, "rewards", rewards)
    mask = mask.astype(bool)

    def backward(carry, inputs):
        next_value, next_advantage = carry
        reward, value, live = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        # an unmasked position passes the later token's value and advantage through unchanged
        carry = (jnp.where(live, value, next_value), jnp.where(live, advantage, next_advantage))
        return carry, jnp.where(live, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(backward, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(mask, advantages + values, 0.0)
