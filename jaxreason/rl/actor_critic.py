"""Actor-critic advantages: a learned critic's train state, and GAE on its values in place of a group baseline.

    critic = CriticTrainer(value_model_from(policy, seed), CriticConfig(), mesh=mesh, num_updates=S, seed=seed)
    advantages, returns = critic.advantages(episodes, rewards, mask)    # [R, T]: GAE on critic_values, normalised
    trainer.update(trainer.batch(episodes, advantages), step)            # the policy, as with group advantages
    critic.update(episodes, returns, mask)                               # one regression step per RL step

The critic is a `ValueModel` (`rl.critic`) on its own copy of the policy's backbone, trained by the generic
sharded train step on the policy's mesh.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.value_head import ValueModel
from jaxreason.rl.advantages import ADVANTAGES, Mask, gae
from jaxreason.rl.critic import critic_objective, critic_values
from jaxreason.rl.rollouts import Episodes
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

GAE = "gae"  # the `advantage` name that selects actor-critic


def check_advantage(name: str) -> None:
    """Fails on an `advantage` setting that is neither GAE nor a group estimator's name (`get_advantage`)."""
    if name != GAE and name not in ADVANTAGES:
        raise ValueError(f"unknown advantage {name!r} (known: {', '.join(sorted([*ADVANTAGES, GAE]))})")


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """GAE's discount and trace decay, and the critic's optimizer (one step per RL step)."""

    gamma: float = 1.0
    lam: float = 0.95
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0)

    def __post_init__(self):
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"critic.gamma and critic.lam must lie in [0, 1], got {self.gamma}, {self.lam}")


def terminal_rewards(rewards: Float[Array, " R"], mask: Mask) -> Float[Array, "R T"]:
    """Each row's sequence reward on its last masked token, 0 elsewhere (and on rows with no masked token)."""
    mask = jnp.asarray(mask).astype(bool)
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    placed = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * jnp.asarray(rewards, jnp.float32)[:, None]
    return jnp.where(mask, placed, 0.0)


def actor_critic_advantages(
    rewards: Float[Array, " R"], values: Float[Array, "R T"], mask: Mask, *, gamma: float, lam: float,
    eps: float = 1e-6,
) -> tuple[Float[Array, "R T"], Float[Array, "R T"]]:
    """GAE on `values` (`critic_values`) with each row's reward on its last masked token; returns (advantages,
    returns), 0 outside `mask`.

    The advantages are normalised over all the batch's masked tokens, (A - mean) / (std + eps), as PPO does: the
    update's step size then does not follow the scale of the rewards or of the critic's errors. The returns, the
    critic's targets, are not.
    """
    mask = jnp.asarray(mask).astype(bool)
    advantages, returns = gae(terminal_rewards(rewards, mask), values, mask, gamma=gamma, lam=lam)
    count = jnp.maximum(jnp.sum(mask), 1)
    mean = jnp.sum(advantages) / count  # advantages are 0 outside the mask
    std = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(advantages - mean), 0.0)) / count)
    return jnp.where(mask, (advantages - mean) / (std + eps), 0.0), returns


class CriticTrainer:
    """The critic's train state on the mesh: its values of episodes and its regression step.

    Args:
      critic: the starting critic (its weights are placed on the mesh; the module itself is not updated).
      config: GAE's settings and the optimizer.
      mesh: the policy's mesh; batches are split over its data and fsdp axes.
      num_updates: update steps of the whole run (one per RL step; the learning-rate schedule's length).
      seed: the train state's key.
      micro_batches: each step's rows in this many micro-batches (memory, as the policy's `micro_batches`).
    """

    def __init__(self, critic: ValueModel, config: CriticConfig, *, mesh: Mesh, num_updates: int, seed: int,
                 micro_batches: int = 1):
        self.config = config
        self.mesh = mesh
        optimizer = make_optimizer(config.optimizer.for_steps(num_updates))
        self.graphdef, self.state, shardings = init_train_state(critic, optimizer, mesh, seed=seed)
        self._step = make_train_step(self.graphdef, critic_objective, optimizer, shardings, mesh,
                                     grad_accum_steps=micro_batches)

    def values(self, tokens: Int[Array, "R T"], attention_mask: Int[Array, "R T"]) -> np.ndarray:
        """[R, T] V_t of the state before each token (`critic_values`), under the current weights."""
        rows = len(tokens)
        if rows % sharding.batch_devices(self.mesh):
            raise ValueError(f"{rows} rows do not split over the mesh's {sharding.batch_devices(self.mesh)} "
                             "data-parallel devices")
        batch = jax.device_put((jnp.asarray(tokens), jnp.asarray(attention_mask)),
                               sharding.batch_sharding(self.mesh, ndim=1))
        with jax.set_mesh(self.mesh):  # the rows lie on every process's devices: each process reads them all
            return np.asarray(addressable(_values(self.graphdef, self.state.trainable, self.state.frozen, *batch)))

    def advantages(self, episodes: Episodes, rewards: Float[Array, " R"], mask: Mask) -> tuple[np.ndarray, np.ndarray]:
        """(advantages, returns) [R, T] of `episodes` (`actor_critic_advantages` on the current values)."""
        values = self.values(episodes.tokens, episodes.attention_mask)
        advantages, returns = actor_critic_advantages(rewards, values, mask, gamma=self.config.gamma,
                                                      lam=self.config.lam)
        return np.asarray(advantages), np.asarray(returns)

    def update(self, episodes: Episodes, returns: Float[Array, "R T"], mask: Mask) -> dict[str, float]:
        """One regression step towards `returns` on the `mask`ed tokens; the step's metrics (loss and value_mae
        of the weights before it)."""
        batch = {"tokens": np.asarray(episodes.tokens), "attention_mask": np.asarray(episodes.attention_mask),
                 "returns": np.asarray(returns, np.float32), "loss_mask": np.asarray(mask, np.int32)}
        self.state, metrics = self._step(self.state, batch)
        return {k: float(v) for k, v in metrics.items()}


@functools.partial(jax.jit, static_argnames="graphdef")
def _values(graphdef, trainable, frozen, tokens, attention_mask):
    return critic_values(nnx.merge(graphdef, trainable, frozen), tokens, attention_mask)
