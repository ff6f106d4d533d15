"""The policy update: sharded over 8 devices as on one, the LoRA-off reference, zero advantages, several passes,
and the pieces SCoRe and self-play build on (two attempts with per-turn KL, per-step advantages, a critic)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason import sharding
from jaxreason.models.lora import LoRAParam, add_lora
from jaxreason.rl.advantages import gae, group_normalized, per_token, step_advantages
from jaxreason.rl.critic import critic_values
from jaxreason.rl.rollouts import sample_episodes
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling import SamplingConfig
from jaxreason.train.optimizer import OptimizerConfig
from tests.tiny import EOS, PAD, TOKENIZER, policy, value_model

SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0)
PROMPTS = [TOKENIZER.encode(q) for q in ("Q: 1 + 2\n", "Q: 7 - 3\n", "Q: 2 * 5\n", "Q: 9 + 9\n")]
CONFIG = PolicyGradientConfig(kl_coef=0.1, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                                      weight_decay=0.0))
ONE_DEVICE = sharding.make_mesh(devices=jax.devices()[:1])


def _episodes(model, **kw):
    return sample_episodes(model, PROMPTS, jax.random.key(0), SAMPLING, group_size=2, eos_ids=(EOS,), pad_id=PAD, **kw)


def _advantages(episodes):
    rewards = np.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5], np.float32)
    return per_token(group_normalized(rewards.reshape(4, 2)).reshape(-1, 1), episodes.token_turn)


def _params(trainer):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.state.trainable))


def test_sharded_update_equals_one_device_update():
    episodes = _episodes(policy(0))
    # Adam's first step divides each gradient by its own size, so a near-zero gradient (the output row of a token
    # no sample uses) turns the sums' rounding order into a visible update; with a larger eps the update stays
    # proportional to the gradient, and the weights compare the sharded gradients themselves
    config = dataclasses.replace(CONFIG, optimizer=dataclasses.replace(CONFIG.optimizer, eps=1e-3))
    results = []
    for mesh in (ONE_DEVICE, sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))):
        trainer = PolicyTrainer(policy(0), config, mesh=mesh, num_updates=4, seed=0)
        metrics = trainer.update(trainer.batch(episodes, _advantages(episodes)), 0)
        results.append((metrics, _params(trainer)))
    (m1, p1), (m8, p8) = results
    for k in ("loss", "pg_loss", "kl", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)


def test_rollouts_sample_the_live_weights():
    trainer = PolicyTrainer(policy(0), CONFIG, mesh=ONE_DEVICE, num_updates=4, seed=0)
    before = _episodes(trainer.policy)
    trainer.update(trainer.batch(before, _advantages(before)), 0)
    greedy = dataclasses.replace(SAMPLING, temperature=0.0)
    after = sample_episodes(trainer.policy, PROMPTS, jax.random.key(0), greedy, group_size=1, eos_ids=(EOS,),
                            pad_id=PAD)
    copy = nnx.merge(trainer.graphdef, jax.tree.map(jnp.copy, trainer.state.trainable), trainer.state.frozen)
    expected = sample_episodes(copy, PROMPTS, jax.random.key(0), greedy, group_size=1, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(after.tokens, expected.tokens)
    # the first update moved the weights: the reference (a copy of the start) now differs from the policy
    ref = trainer.logprobs(before.tokens, before.attention_mask, reference=True)
    live = trainer.logprobs(before.tokens, before.attention_mask)
    assert float(jnp.max(jnp.abs(ref - live))) > 1e-3


def test_equal_rewards_give_zero_advantage_and_only_the_kl_moves_the_weights():
    episodes = _episodes(policy(0))
    advantages = per_token(group_normalized(jnp.ones((4, 2))).reshape(-1, 1), episodes.token_turn)
    assert not np.any(np.isnan(advantages)) and not np.any(advantages)
    config = dataclasses.replace(CONFIG, kl_coef=0.0)
    trainer = PolicyTrainer(policy(0), config, mesh=ONE_DEVICE, num_updates=4, seed=0)
    start = _params(trainer)
    metrics = trainer.update(trainer.batch(episodes, advantages), 0)
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, _params(trainer), start)


def test_lora_reference_is_the_base_without_a_second_copy():
    model = policy(0)
    add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    base = policy(0)
    episodes = _episodes(base)
    config = dataclasses.replace(CONFIG, reference="lora_base")
    trainer = PolicyTrainer(model, config, mesh=ONE_DEVICE, num_updates=4, seed=0, trainable=LoRAParam)
    assert trainer.reference is None
    trainer.update(trainer.batch(episodes, _advantages(episodes)), 0)
    ref = trainer.logprobs(episodes.tokens, episodes.attention_mask, reference=True)
    base_trainer = PolicyTrainer(base, CONFIG, mesh=ONE_DEVICE, num_updates=4, seed=0)
    np.testing.assert_allclose(ref, base_trainer.logprobs(episodes.tokens, episodes.attention_mask), atol=1e-5)
    with pytest.raises(ValueError, match="needs a policy with LoRA adapters"):
        PolicyTrainer(policy(0), config, mesh=ONE_DEVICE, num_updates=4, seed=0)


def test_several_passes_in_minibatches_measure_the_ratio_against_the_sampling_weights():
    episodes = _episodes(policy(0))
    config = dataclasses.replace(CONFIG, epochs=3, minibatch_rows=4, clip_eps=0.05)
    trainer = PolicyTrainer(policy(0), config, mesh=ONE_DEVICE, num_updates=6, seed=0)
    batch = trainer.batch(episodes, _advantages(episodes))
    assert "old_logprobs" in batch
    metrics = trainer.update(batch, 0)
    assert trainer.step == 6
    assert metrics["clip_fraction"] > 0  # later passes move past the 5% trust region
    uneven = PolicyTrainer(policy(0), dataclasses.replace(config, minibatch_rows=3), mesh=ONE_DEVICE,
                           num_updates=6, seed=0)
    with pytest.raises(ValueError, match="8 rollout rows do not split into minibatches of 3"):
        uneven.update(batch, 0)


def test_two_attempts_with_per_turn_kl_weights_and_rewards():
    """SCoRe's shape: attempt 1's tokens under a strong KL, attempt 2's under a weak one, per-turn advantages."""
    instruction = TOKENIZER.encode("Fix it.\n")
    trainer = PolicyTrainer(policy(0), CONFIG, mesh=ONE_DEVICE, num_updates=4, seed=0)
    episodes = _episodes(trainer.policy, instructions=[instruction])
    turn_rewards = np.tile(np.asarray([[0.0, 1.0], [1.0, 1.0]], np.float32), (4, 1))  # [R, J]
    advantages = per_token(jnp.asarray(turn_rewards) - 0.5, episodes.token_turn)
    kl_coefs = per_token(jnp.tile(jnp.asarray([[1.0, 0.01]]), (8, 1)), episodes.token_turn)
    turn = np.asarray(episodes.token_turn)
    assert np.all(np.asarray(kl_coefs)[turn == 0] == 1.0) and np.allclose(np.asarray(kl_coefs)[turn == 1], 0.01)
    assert np.all(np.asarray(kl_coefs)[turn < 0] == 0.0)
    metrics = trainer.update(trainer.batch(episodes, advantages, kl_coefs=kl_coefs), 0)
    assert np.isfinite(metrics["loss"]) and trainer.step == 1


def test_per_step_and_critic_advantages_feed_the_same_update():
    """Self-play's shapes: advantages per reasoning step (Setlur et al.) and from a learned critic (GAE)."""
    trainer = PolicyTrainer(policy(0), CONFIG, mesh=ONE_DEVICE, num_updates=4, seed=0)
    episodes = _episodes(trainer.policy)
    # per step: each generated token's step index (here: first half / second half of the attempt)
    mask = np.asarray(episodes.loss_mask())
    step_index = np.where(mask > 0, (np.cumsum(mask, axis=1) - 1) * 2 // np.maximum(mask.sum(1, keepdims=True), 1), -1)
    prefix_values = jnp.asarray(np.tile([[0.2, 0.5, 1.0]], (8, 1)), jnp.float32)  # Q(prompt), Q(step 1), Q(step 2)
    per_step = step_advantages(prefix_values, jnp.ones((8, 2)))
    np.testing.assert_allclose(per_step[0], [0.3, 0.5], rtol=1e-6)
    trainer.update(trainer.batch(episodes, per_token(per_step, jnp.asarray(step_index))), 0)
    # critic: V at each token, the outcome at each row's last generated token, GAE over the generated tokens
    values = critic_values(value_model(), jnp.asarray(episodes.tokens), jnp.asarray(episodes.attention_mask))
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    rewards = np.zeros(mask.shape, np.float32)
    rewards[np.arange(8), last] = 1.0
    advantages, returns = gae(jnp.asarray(rewards), values, jnp.asarray(mask), gamma=1.0, lam=0.95)
    assert np.all(np.asarray(advantages)[mask == 0] == 0)
    metrics = trainer.update(trainer.batch(episodes, advantages), 1)
    assert np.isfinite(metrics["loss"]) and trainer.step == 2


def test_micro_batches_give_the_same_update():
    episodes = _episodes(policy(0))
    params = []
    for micro in (1, 2):
        config = dataclasses.replace(CONFIG, aggregation="token_mean", micro_batches=micro)
        trainer = PolicyTrainer(policy(0), config, mesh=ONE_DEVICE, num_updates=4, seed=0)
        trainer.update(trainer.batch(episodes, _advantages(episodes)), 0)
        params.append(_params(trainer))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *params)
