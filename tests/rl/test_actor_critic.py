"""Actor-critic: GAE on the critic's values by hand, and one RL step with a critic on the tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.model_states import value_model_from
from jaxreason.algorithms.rl_steps import group_step
from jaxreason.rl.actor_critic import CriticConfig, CriticTrainer, actor_critic_advantages
from jaxreason.rl.advantages import gae
from jaxreason.rl.critic import critic_values
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import prompt_ids
from jaxreason.tasks import get_task
from jaxreason.train.optimizer import OptimizerConfig

# tests/algorithms/test_grpo.py's shapes (task, N = 2 problems x G = 4 samples, 24 new tokens, its update), so
# the compiled programs are shared
TASK = get_task("arith", min_ops=1, max_ops=1, max_operand=12, max_factor=2, ops="+", check_steps=True)
SAMPLING = SamplingConfig(max_new_tokens=24, temperature=0.7)
UPDATE = PolicyGradientConfig(optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=5, weight_decay=0.0))


def test_advantages_are_normalised_gae_with_the_reward_on_the_last_token():
    # row 0: 3 response tokens (t = 2..4), reward 1; row 1: 2 (t = 1..2), reward 0; gamma 1, lam 0.5
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    values = np.array([[0, 0, .5, .6, .7], [0, .4, .2, 0, 0]], np.float32)
    advantages, returns = actor_critic_advantages(np.array([1.0, 0.0]), values, mask, gamma=1.0, lam=0.5)
    # delta_t = r_t + V_next - V_t, A_t = delta_t + 0.5 A_next, R_t = A_t + V_t
    # row 0: A_4 = 1 - .7 = .3, A_3 = (.7 - .6) + .15 = .25, A_2 = (.6 - .5) + .125 = .225
    # row 1: A_2 = 0 - .2 = -.2, A_1 = (.2 - .4) - .1 = -.3
    raw = np.array([.225, .25, .3, -.3, -.2])
    np.testing.assert_allclose(np.asarray(returns)[mask == 1], [.725, .85, 1.0, .1, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(advantages)[mask == 1], (raw - raw.mean()) / (raw.std() + 1e-6),
                               rtol=1e-5)
    assert np.all(np.asarray(advantages)[mask == 0] == 0) and np.all(np.asarray(returns)[mask == 0] == 0)


def _first_token_parity(problems, prompts, completions):
    """A reward that varies between the random policy's samples (the checker gives it 0 everywhere)."""
    return [float(c[0] % 2) for c in completions]


def test_an_actor_critic_step_uses_gae_on_the_critics_values_and_trains_both():
    mesh = sharding.make_mesh(sharding.MeshConfig())
    policy = tiny.policy()
    critic = CriticTrainer(value_model_from(policy, 0), CriticConfig(), mesh=mesh, num_updates=4, seed=0)
    trainer = PolicyTrainer(policy, UPDATE, mesh=mesh, num_updates=4, seed=0)
    problems = TASK.problems("train", n=2, seed=0)
    prompts = [prompt_ids(tiny.TOKENIZER, TASK.prompt(p)) for p in problems]
    before = jax.tree.map(jnp.copy, (critic.state.trainable, critic.state.frozen))  # the step donates the state

    done = group_step(trainer, problems, prompts, np.arange(2), 0, jax.random.key(0), sampling=SAMPLING,
                      group_size=4, advantage="gae", truncation="keep", reward_fn=_first_token_parity,
                      eos_ids=(tiny.EOS,), pad_id=tiny.PAD, mesh=mesh, critic=critic)

    episodes, mask = done.episodes, done.episodes.loss_mask()
    assert 0 < done.rewards.mean() < 1
    values = critic_values(nnx.merge(critic.graphdef, *before), jnp.asarray(episodes.tokens),
                           jnp.asarray(episodes.attention_mask))
    # each row's reward on its last response token: the prompt's length plus the sample's, minus 1
    last = (np.asarray(episodes.attention_mask).sum(1) - 1)
    rewards = np.zeros(mask.shape, np.float32)
    rewards[np.arange(len(last)), last] = done.rewards
    assert np.all(mask[np.arange(len(last)), last] == 1)
    raw, _ = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    raw = np.asarray(raw)[mask == 1]
    np.testing.assert_allclose(done.advantages[mask == 1], (raw - raw.mean()) / (raw.std() + 1e-6), atol=2e-5)
    assert np.all(done.advantages[mask == 0] == 0)

    # the policy took its update (at the warmup's learning rate 0: a gradient, no change yet), and the critic
    # its step, whose loss the record carries
    assert trainer.step == 1 and int(critic.state.step) == 1
    assert np.isfinite(done.metrics["loss"]) and done.metrics["grad_norm"] > 0
    assert done.metrics["critic_loss"] > 0 and 0 < done.metrics["value_mae"] < 1

    # on a fixed batch the critic's loss falls step by step (the learning rate has decayed to 1e-4 by step 4)
    _, returns = critic.advantages(episodes, done.rewards, mask)
    losses = [critic.update(episodes, returns, mask)["loss"] for _ in range(4)]
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
