"""The critic reads V_t at t - 1 (the state before token t) and fits returns under the sharded train step."""

import jax
import numpy as np
import tiny

from jaxreason import sharding
from jaxreason.rl.critic import critic_objective, critic_values
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

PROMPT = "Q: 2+3?\n"  # 8 tokens, one per character


def _batch():
    """Two rows of 12 tokens: an 8-token prompt, a response, right padding; returns on the response tokens."""
    rows = [tiny.TOKENIZER.encode(PROMPT + r, add_special_tokens=False) for r in ("so 5", "4")]
    tokens = np.full((2, 12), tiny.PAD, np.int32)
    attention_mask = np.zeros((2, 12), np.int32)
    loss_mask = np.zeros((2, 12), np.int32)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)] = ids
        attention_mask[b, : len(ids)] = 1
        loss_mask[b, len(PROMPT): len(ids)] = 1
    returns = np.zeros((2, 12), np.float32)
    returns[0, 8:12] = [0.6, 0.7, 0.8, 0.9]  # row 0 is right: its returns climb towards 1
    returns[1, 8] = 0.1  # row 1 is wrong
    return {"tokens": tokens, "attention_mask": attention_mask, "returns": returns, "loss_mask": loss_mask}


def test_critic_values_read_the_previous_position():
    critic, batch = tiny.value_model(), _batch()
    prefix_values = np.asarray(critic.values(batch["tokens"], batch["attention_mask"]))
    values = np.asarray(critic_values(critic, batch["tokens"], batch["attention_mask"]))
    assert values.shape == (2, 12)
    # the first response token of row 0 (t = 8) is valued in the state after the prompt's last token (t = 7)
    assert values[0, 8] == prefix_values[0, 7]
    np.testing.assert_array_equal(values[:, 1:], prefix_values[:, :-1])
    np.testing.assert_array_equal(values[:, 0], 0.0)
    # the loss scores exactly those values against the returns, on the response tokens only:
    # row 0 at t = 8..11 and row 1 at t = 8 -> 5 tokens
    loss, metrics = critic_objective(critic, batch, jax.random.key(0))
    r = batch["returns"]
    by_hand = (sum((values[0, t] - r[0, t]) ** 2 for t in range(8, 12)) + (values[1, 8] - r[1, 8]) ** 2) / 5
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
    assert metrics["num_tokens"] == 5
    by_hand_mae = (sum(abs(values[0, t] - r[0, t]) for t in range(8, 12)) + abs(values[1, 8] - r[1, 8])) / 5
    np.testing.assert_allclose(metrics["value_mae"], by_hand_mae, rtol=1e-5)


def test_training_the_critic_fits_the_returns_it_can_fit():
    # Both rows share the prompt, so the value before their first response token (read at t = 7) is one number
    # that must serve row 0's return 0.6 and row 1's 0.1: at best their mean 0.35, so the loss cannot fall below
    # 2 * 0.25^2 / 5 = 0.025, while every later token has a prefix of its own and can be fitted exactly. A critic
    # that read the value at t itself would see the two responses apart and could reach 0.
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=0, total_steps=15))
    graphdef, state, shardings = init_train_state(tiny.value_model(), optimizer, mesh)
    step = make_train_step(graphdef, critic_objective, optimizer, shardings, mesh)
    batch = _batch()
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["num_tokens"]) == 5
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0.0249 < losses[-1] < 0.027, losses
