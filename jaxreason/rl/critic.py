"""The learned critic of actor-critic training: a `ValueModel` read per token, and its regression objective.

Alignment. The `ValueModel`'s sigmoid at position t is the value of the prefix `tokens[:, :t + 1]`, i.e. of the
state *after* token t. The actor's decision at a response token t is made in the state before it, which the
policy reads at t - 1 (its `logits[:, t - 1]` predict `tokens[:, t]`, see `jaxreason.train.losses`). So the
critic's value for token t is read at t - 1 as well:

    critic_values(...)[:, t] = sigmoid(value_logits[:, t - 1]) = V(tokens[:, :t])    for t >= 1

and lies on the target position, where `loss_mask`, the rewards and `gae`'s values lie. Column 0 has no
preceding state; it is 0 and never a response token (every row starts with a prompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.models.value_head import ValueModel
from jaxreason.train import losses
from jaxreason.train.step import TOKEN_COUNT


def critic_values(
    critic: ValueModel, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """V_t = V(tokens[:, :t]), the value in [0, 1] of the state before token t (read at t - 1); column 0 is 0.

    These are `gae`'s values: out[:, t] = sigmoid(critic(tokens)[:, t - 1]) for t >= 1.
    """
    values = jax.nn.sigmoid(critic(tokens, attention_mask))
    return jnp.pad(values[:, :-1], ((0, 0), (1, 0)))


def critic_objective(model: ValueModel, batch: dict[str, Array], key: Array):
    """Value regression for actor-critic: MSE between V_t (as in `critic_values`) and the returns.

    batch: tokens, attention_mask, returns [B, T] (e.g. `gae`'s), loss_mask [B, T] (1 on the response tokens).
    loss = mean over masked t of (sigmoid(value_logits[:, t - 1]) - returns[:, t])^2, so the returns must lie in
    [0, 1] (rewards in [0, 1], gamma <= 1) for a perfect fit to exist. Metrics: loss, value_mae (mean
    |V_t - returns_t|), num_tokens (the masked token count, which weights micro-batches in the train step).
    """
    del key  # deterministic
    value_logits = model(batch["tokens"], batch["attention_mask"])
    mask = batch["loss_mask"][:, 1:]  # the value read at t - 1 is scored against the return at t
    loss, metrics = losses.value_loss(value_logits[:, :-1], batch["returns"][:, 1:], mask, kind="mse")
    return loss, {"loss": loss, "value_mae": metrics["mae"], TOKEN_COUNT: jnp.sum(mask.astype(jnp.float32))}
