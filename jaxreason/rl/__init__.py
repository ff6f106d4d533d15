"""On-policy RL: rollouts from the live weights, rewards, advantage estimators, and the clipped-ratio update.

    episodes   = sample_episodes(trainer.policy, prompts, key, sampling, group_size=G, ...)   # [R, T], J attempts
    rewards    = checked_rewards(task_reward(task, tokenizer), problems, prompts, episodes.attempt(0))
    advantages = per_token(group_normalized(rewards.reshape(N, G)).reshape(-1, 1), episodes.token_turn)
    metrics    = trainer.update(trainer.batch(episodes, advantages), iteration)
"""

from jaxreason.rl.actor_critic import CriticConfig, CriticTrainer, actor_critic_advantages
from jaxreason.rl.advantages import (
    ADVANTAGES,
    gae,
    get_advantage,
    group_normalized,
    leave_one_out,
    per_token,
    register_advantage,
    step_advantages,
)
from jaxreason.rl.critic import critic_objective, critic_values
from jaxreason.rl.loss import clipped_policy_loss, policy_gradient_objective, sequence_token_logprobs
from jaxreason.rl.prefix_values import PrefixValues, prefix_values, step_index
from jaxreason.rl.rewards import RewardFn, apply_truncation, checked_rewards, task_reward, verifier_reward
from jaxreason.rl.rollouts import NOT_TRAINED, Episodes, sample_episodes
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer

__all__ = [
    "ADVANTAGES", "CriticConfig", "CriticTrainer", "Episodes", "NOT_TRAINED", "PolicyGradientConfig",
    "PolicyTrainer", "PrefixValues", "RewardFn", "actor_critic_advantages", "apply_truncation", "checked_rewards",
    "clipped_policy_loss", "critic_objective", "critic_values", "gae", "get_advantage", "group_normalized",
    "leave_one_out", "per_token", "policy_gradient_objective", "prefix_values", "register_advantage",
    "sample_episodes", "sequence_token_logprobs", "step_advantages", "step_index", "task_reward", "verifier_reward",
]
