"""Every loss against a small case worked out by hand with numpy/math, plus gradients and a jitted call."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.train import losses

ATOL = 1e-5


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - math.log(sum(math.exp(x) for x in row))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# B=2, T=3, V=3: row 0 predicts tokens 2 then 0; row 1 predicts 1 then 1.
LOGITS = np.array(
    [[[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [9.0, 9.0, 9.0]],
     [[0.0, 0.0, 0.0], [2.0, 1.0, -2.0], [9.0, 9.0, 9.0]]],
    np.float32,
)
TOKENS = np.array([[1, 2, 0], [2, 1, 1]], np.int32)
# Row 0: both targets are completion tokens; row 1: only the last one (its first target is prompt).
LOSS_MASK = np.array([[0, 1, 1], [0, 0, 1]], np.int32)


def _hand_token_logprobs():
    return np.array(
        [[_log_softmax(LOGITS[0, 0])[2], _log_softmax(LOGITS[0, 1])[0]],
         [_log_softmax(LOGITS[1, 0])[1], _log_softmax(LOGITS[1, 1])[1]]]
    )


# ---------------------------------------------------------------- next-token likelihood


def test_token_logprobs_aligns_next_token():
    # log softmax([1, 2, 3])[2] = 3 - log(e + e^2 + e^3) = -0.40760596
    assert _hand_token_logprobs()[0, 0] == pytest.approx(-0.40760596, abs=1e-7)
    out = jax.jit(losses.token_logprobs)(LOGITS, TOKENS)
    assert out.shape == (2, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _hand_token_logprobs(), atol=ATOL)


def test_token_logprobs_is_stable_for_huge_bfloat16_logits():
    logits = jnp.array([[[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]], jnp.bfloat16)
    out = losses.token_logprobs(logits, jnp.array([[0, 2]]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[-2000.0]], atol=ATOL)


def test_sft_loss_averages_over_all_masked_tokens_of_the_batch():
    lp = _hand_token_logprobs()
    expected = -(lp[0, 0] + lp[0, 1] + lp[1, 1]) / 3  # 3 masked targets; a per-row mean would differ
    # argmax: row 0 predicts 2 (hit), 0 (hit); row 1 predicts 0 (first token is unmasked), 0 vs 1 (miss)
    loss, metrics = jax.jit(losses.sft_loss)(LOGITS, TOKENS, LOSS_MASK)
    assert loss == pytest.approx(expected, abs=ATOL)
    assert metrics["loss"] == pytest.approx(expected, abs=ATOL)
    assert metrics["num_tokens"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3, abs=ATOL)


def test_sft_loss_gradient_is_softmax_minus_onehot_at_masked_targets():
    grad = np.asarray(jax.grad(lambda x: losses.sft_loss(x, TOKENS, LOSS_MASK)[0])(jnp.asarray(LOGITS)))
    expected = np.zeros_like(LOGITS)
    for b, t in [(0, 0), (0, 1), (1, 1)]:  # (row, predicting position) of the masked targets
        probs = np.exp(_log_softmax(LOGITS[b, t]))
        probs[TOKENS[b, t + 1]] -= 1.0
        expected[b, t] = probs / 3
    np.testing.assert_allclose(grad, expected, atol=ATOL)


def test_sft_loss_with_no_masked_tokens_is_zero_not_nan():
    zeros = np.zeros_like(LOSS_MASK)
    loss_and_grad = jax.value_and_grad(losses.sft_loss, has_aux=True)
    (loss, metrics), grad = loss_and_grad(jnp.asarray(LOGITS), TOKENS, zeros)
    assert loss == 0.0 and metrics["num_tokens"] == 0 and metrics["accuracy"] == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_sequence_logprob_sums_completion_tokens():
    lp = _hand_token_logprobs()
    out = jax.jit(losses.sequence_logprob)(LOGITS, TOKENS, LOSS_MASK.astype(bool))
    np.testing.assert_allclose(out, [lp[0, 0] + lp[0, 1], lp[1, 1]], atol=ATOL)


# ---------------------------------------------------------------- process reward model

# sigmoid(0) = 0.5, sigmoid(log 3) = 0.75; the middle position is not a step end.
VALUE_LOGITS = np.array([[0.0, 5.0, math.log(3.0)]], np.float32)
VALUE_TARGETS = np.array([[1.0, 0.0, 0.25]], np.float32)
VALUE_MASK = np.array([[1, 0, 1]], np.int32)


def test_value_loss_mse():
    mse = jax.jit(losses.value_loss, static_argnames="kind")
    loss, metrics = mse(VALUE_LOGITS, VALUE_TARGETS, VALUE_MASK)
    assert loss == pytest.approx((0.5**2 + 0.5**2) / 2, abs=ATOL)  # (0.5 - 1)^2, (0.75 - 0.25)^2
    assert metrics["mae"] == pytest.approx(0.5, abs=ATOL)


def test_value_loss_bce_with_soft_labels_and_its_gradient():
    loss, metrics = jax.jit(losses.value_loss, static_argnames="kind")(
        VALUE_LOGITS, VALUE_TARGETS, VALUE_MASK, kind="bce"
    )
    first = -math.log(0.5)  # target 1, p = 0.5
    last = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert loss == pytest.approx((first + last) / 2, abs=ATOL)
    assert metrics["mae"] == pytest.approx(0.5, abs=ATOL)
    # d BCE / d logit = sigmoid(logit) - target, averaged over the 2 step ends
    bce = lambda x: losses.value_loss(x, VALUE_TARGETS, VALUE_MASK, kind="bce")[0]
    grad = jax.grad(bce)(jnp.asarray(VALUE_LOGITS))
    np.testing.assert_allclose(grad, [[(0.5 - 1.0) / 2, 0.0, (0.75 - 0.25) / 2]], atol=ATOL)


def test_value_loss_bce_is_finite_for_extreme_logits():
    logits, targets = jnp.array([[200.0, -200.0]]), jnp.array([[0.0, 1.0]])
    loss, _ = losses.value_loss(logits, targets, jnp.ones((1, 2)), kind="bce")
    assert loss == pytest.approx(200.0, rel=1e-5)


def test_value_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="huber"):
        losses.value_loss(VALUE_LOGITS, VALUE_TARGETS, VALUE_MASK, kind="huber")


# ---------------------------------------------------------------- preference losses


def test_dpo_loss_by_hand():
    pc, pr = np.array([-1.0, -2.0], np.float32), np.array([-3.0, -1.0], np.float32)
    rc, rr = np.array([-2.0, -2.0], np.float32), np.array([-2.0, -2.0], np.float32)
    beta = 0.5
    # pair 0: chosen reward 0.5*(1) = 0.5, rejected 0.5*(-1) = -0.5, margin 1
    # pair 1: chosen reward 0,              rejected 0.5*(1)  =  0.5, margin -0.5
    log_sig = lambda x: math.log(_sigmoid(x))
    plain = (-log_sig(1.0) - log_sig(-0.5)) / 2
    smoothed = (-(0.9 * log_sig(1.0) + 0.1 * log_sig(-1.0)) - (0.9 * log_sig(-0.5) + 0.1 * log_sig(0.5))) / 2
    dpo = jax.jit(losses.dpo_loss)
    loss, metrics = dpo(pc, pr, rc, rr, beta)
    assert loss == pytest.approx(plain, abs=ATOL)
    assert metrics["reward_accuracy"] == pytest.approx(0.5)
    assert metrics["reward_margin"] == pytest.approx(0.25, abs=ATOL)
    assert metrics["chosen_reward"] == pytest.approx(0.25, abs=ATOL)
    assert metrics["rejected_reward"] == pytest.approx(0.0, abs=ATOL)
    assert dpo(pc, pr, rc, rr, beta, 0.1)[0] == pytest.approx(smoothed, abs=ATOL)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    args = [jnp.zeros(2)] * 4
    grads = jax.grad(lambda *a: losses.dpo_loss(*a, beta=0.1)[0], argnums=(0, 1, 2, 3))
    g_chosen, g_rejected, g_ref_chosen, _ = grads(*args)
    # at h = 0: d/d pc of -log sigmoid(beta h) = -beta * sigmoid(0) = -0.05, averaged over 2 pairs
    np.testing.assert_allclose(g_chosen, [-0.025, -0.025], atol=ATOL)
    np.testing.assert_allclose(g_rejected, [0.025, 0.025], atol=ATOL)
    np.testing.assert_allclose(g_ref_chosen, [0.025, 0.025], atol=ATOL)


def test_dpo_score():
    out = jax.jit(losses.dpo_score)(jnp.array([-1.0, -5.0]), jnp.array([-3.0, -4.0]), 0.1)
    np.testing.assert_allclose(out, [0.2, -0.1], atol=ATOL)


def test_bradley_terry_loss():
    loss, metrics = jax.jit(losses.bradley_terry_loss)(jnp.array([2.0, 0.0]), jnp.array([1.0, 3.0]))
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-3) = log(1 + e^3)
    assert loss == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(3))) / 2, abs=ATOL)
    assert metrics["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------- multi-turn RL

# 1 prompt, 3 samples, 2 turns, 6 tokens; -1 marks prompt / feedback / padding.
TURN = np.array([[[-1, 0, 0, -1, 1, 1],
                  [-1, 0, 0, -1, 1, 1],
                  [-1, 0, -1, 1, -1, -1]]], np.int32)
NUM_TRAINED = 10
REWARDS = np.array([[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]], np.float32)
# alpha = 0: returns G = [[1, 1], [2, 1], [0, 0]]; leave-one-out baselines
#   s0: mean(G1, G2) = [1, 0.5]; s1: mean(G0, G2) = [0.5, 0.5]; s2: mean(G0, G1) = [1.5, 1]
ADV = np.array([[0.0, 0.5], [1.5, 0.5], [-1.5, -1.0]])
# alpha = 1: shaped last reward r1 + (r1 - r0) = [2, 1, 0] -> G = [[2, 2], [2, 1], [0, 0]]
#   baselines s0: [1, 0.5]; s1: [1, 1]; s2: [2, 1.5]
ADV_BONUS = np.array([[1.0, 1.5], [1.0, 0.0], [-2.0, -1.5]])
LOGP = np.linspace(-2.0, -0.1, 18, dtype=np.float32).reshape(1, 3, 6)


def _per_token(adv):
    """[S, J] advantages -> [1, S, L]: each trained token gets its turn's advantage, others 0."""
    return np.where(TURN >= 0, adv[np.arange(3)[None, :, None], np.maximum(TURN, 0)], 0.0)


def _pg_grad(alpha):
    pg = lambda lp: losses.multi_turn_pg_loss(lp, LOGP, TURN, REWARDS, (0.0, 0.0), alpha)[1]["pg_loss"]
    return np.asarray(jax.grad(pg)(jnp.asarray(LOGP)))


def test_multi_turn_advantages_by_hand():
    expected = -_per_token(ADV) / NUM_TRAINED
    assert expected[0, 1, 1] == pytest.approx(-0.15) and expected[0, 2, 3] == pytest.approx(0.1)
    np.testing.assert_allclose(_pg_grad(0.0), expected, atol=ATOL)  # zero at untrained tokens too
    loss, metrics = losses.multi_turn_pg_loss(LOGP, LOGP, TURN, REWARDS, (1.0, 1.0))
    assert metrics["pg_loss"] == pytest.approx(-np.sum(_per_token(ADV) * LOGP) / NUM_TRAINED, abs=ATOL)
    assert loss == pytest.approx(float(metrics["pg_loss"]), abs=ATOL)  # no KL when logp == ref
    assert metrics["advantage_abs"] == pytest.approx(5 / 6, abs=ATOL)
    assert metrics["reward_turn0"] == pytest.approx(1 / 3) and metrics["reward_turn1"] == pytest.approx(2 / 3)


def test_multi_turn_bonus_shapes_the_last_turn():
    np.testing.assert_allclose(_pg_grad(1.0), -_per_token(ADV_BONUS) / NUM_TRAINED, atol=ATOL)
    _, metrics = losses.multi_turn_pg_loss(LOGP, LOGP, TURN, REWARDS, (0.0, 0.0), bonus_alpha=1.0)
    assert metrics["reward_turn1"] == pytest.approx(2 / 3)  # metrics report the unshaped reward


def test_multi_turn_kl_penalty():
    _, same = losses.multi_turn_pg_loss(LOGP, LOGP, TURN, REWARDS, (10.0, 0.1))
    assert same["kl_loss"] == 0.0 and same["kl_turn0"] == 0.0 and same["kl_turn1"] == 0.0
    kl = lambda lp: losses.multi_turn_pg_loss(lp, LOGP, TURN, REWARDS, (10.0, 0.1))[1]["kl_loss"]
    assert not np.any(jax.grad(kl)(jnp.asarray(LOGP)))  # the k3 penalty is flat at the reference

    ref = LOGP - 0.5 * (TURN == 0) + 0.2 * (TURN == 1)  # untrained tokens differ not at all
    ref[TURN < 0] += 3.0  # ...and now wildly, which must not count
    _, metrics = losses.multi_turn_pg_loss(LOGP, ref, TURN, REWARDS, (10.0, 0.1))
    k3 = lambda d: math.exp(d) - d - 1.0  # d = ref - logp
    assert metrics["kl_turn0"] == pytest.approx(k3(-0.5), abs=ATOL) and metrics["kl_turn0"] > 0
    assert metrics["kl_turn1"] == pytest.approx(k3(0.2), abs=ATOL) and metrics["kl_turn1"] > 0
    # 5 turn-0 and 5 turn-1 tokens out of 10 trained
    expected_kl = (5 * 10.0 * k3(-0.5) + 5 * 0.1 * k3(0.2)) / NUM_TRAINED
    assert metrics["kl_loss"] == pytest.approx(expected_kl, abs=ATOL)
    assert metrics["loss"] == pytest.approx(float(metrics["pg_loss"]) + expected_kl, abs=ATOL)


def test_multi_turn_jits_with_a_traced_alpha():
    fn = jax.jit(losses.multi_turn_pg_loss, static_argnames="kl_coefs")
    loss, metrics = fn(LOGP, LOGP, TURN, REWARDS, kl_coefs=(1.0, 1.0), bonus_alpha=jnp.float32(1.0))
    assert metrics["pg_loss"] == pytest.approx(-np.sum(_per_token(ADV_BONUS) * LOGP) / NUM_TRAINED, abs=ATOL)
    assert loss.shape == () and loss.dtype == jnp.float32


def test_multi_turn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="S >= 2"):
        losses.multi_turn_pg_loss(LOGP[:, :1], LOGP[:, :1], TURN[:, :1], REWARDS[:, :1], (1.0, 1.0))
    with pytest.raises(ValueError, match="kl_coefs"):
        losses.multi_turn_pg_loss(LOGP, LOGP, TURN, REWARDS, (1.0,))


# ---------------------------------------------------------------- generative verifier

YES, NO = 1, 2
# B=2, T=4, V=4; row 0's verdict sits at index 2 (predicted at 1), row 1's at index 3 (predicted at 2).
VERDICT_LOGITS = np.zeros((2, 4, 4), np.float32)
VERDICT_LOGITS[0, 1] = [0.0, 2.0, 1.0, -1.0]
VERDICT_LOGITS[1, 2] = [1.0, 0.5, 0.0, 3.0]
VERDICT_LOGITS[:, 3] = 50.0  # the slot after the verdict must be ignored
VERDICT_TOKENS = np.array([[3, 0, YES, 0], [3, 0, 0, NO]], np.int32)
VERDICT_POSITION = np.array([2, 3], np.int32)


def test_verdict_loss_and_p_yes_by_hand():
    lp0, lp1 = _log_softmax(VERDICT_LOGITS[0, 1]), _log_softmax(VERDICT_LOGITS[1, 2])
    labels = np.array([True, False])
    loss, metrics = jax.jit(losses.verdict_loss, static_argnums=(3, 4))(
        VERDICT_LOGITS, VERDICT_TOKENS, VERDICT_POSITION, YES, NO, labels
    )
    assert loss == pytest.approx(-(lp0[YES] + lp1[NO]) / 2, abs=ATOL)
    # row 0: P(Yes) > P(No), label True -> right; row 1: logit 0.5 > 0.0 says Yes, label False -> wrong
    assert metrics["accuracy"] == pytest.approx(0.5)
    flipped, _ = losses.verdict_loss(VERDICT_LOGITS, VERDICT_TOKENS, VERDICT_POSITION, YES, NO, ~labels)
    assert flipped == pytest.approx(-(lp0[NO] + lp1[YES]) / 2, abs=ATOL)

    # full softmax: e^2 / (1 + e^2 + e + e^-1) and e^0.5 / (e + e^0.5 + 1 + e^3)
    expected = [math.exp(2) / (1 + math.exp(2) + math.exp(1) + math.exp(-1)),
                math.exp(0.5) / (math.exp(1) + math.exp(0.5) + 1 + math.exp(3))]
    out = jax.jit(losses.p_yes, static_argnums=2)(VERDICT_LOGITS, VERDICT_POSITION, YES)
    np.testing.assert_allclose(out, expected, atol=ATOL)


def test_verdict_loss_gradient_touches_only_the_verdict_slot():
    labels = jnp.array([True, False])
    grad = jax.grad(lambda x: losses.verdict_loss(x, VERDICT_TOKENS, VERDICT_POSITION, YES, NO, labels)[0])(
        jnp.asarray(VERDICT_LOGITS)
    )
    touched = np.argwhere(np.any(np.asarray(grad) != 0, axis=-1))
    np.testing.assert_array_equal(touched, [[0, 1], [1, 2]])
    probs = np.exp(_log_softmax(VERDICT_LOGITS[0, 1]))
    probs[YES] -= 1.0
    np.testing.assert_allclose(grad[0, 1], probs / 2, atol=ATOL)
