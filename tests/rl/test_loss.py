"""The clipped-ratio loss against hand computations, and the on-policy gradient against REINFORCE's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.rl.loss import clipped_policy_loss

# two rows, three target positions; row 1's last token is not trained
LOGP = jnp.log(jnp.asarray([[0.5, 0.25, 0.5], [0.8, 0.1, 0.3]]))
OLD = jnp.log(jnp.asarray([[0.25, 0.25, 0.5], [0.8, 0.2, 0.3]]))  # ratios: 2, 1, 1 / 1, 0.5, (1)
ADV = jnp.asarray([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
MASK = jnp.asarray([[1, 1, 1], [1, 1, 0]])


def test_clipping_by_hand():
    # rho A against clip(rho, 0.8, 1.2) A, the smaller one, negated:
    # row 0: rho 2 -> min(2, 1.2) = 1.2; 1; 1      -> pg -1.2, -1, -1
    # row 1: rho 1, A -2 -> -2; rho 0.5: min(-1, -1.6) = -1.6 -> pg 2, 1.6
    loss, m = clipped_policy_loss(LOGP, OLD, LOGP, ADV, MASK, jnp.zeros((2, 3)), clip_eps=0.2)
    pg = [-1.2, -1.0, -1.0, 2.0, 1.6]
    np.testing.assert_allclose(loss, np.mean(pg), rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(m["num_tokens"], 5)
    np.testing.assert_allclose(m["kl"], 0.0, atol=1e-7)
    # sequence_mean: row means -3.2 / 3 and 3.6 / 2, then their mean
    loss, m = clipped_policy_loss(LOGP, OLD, LOGP, ADV, MASK, jnp.zeros((2, 3)), clip_eps=0.2,
                                  aggregation="sequence_mean")
    np.testing.assert_allclose(loss, (-3.2 / 3 + 3.6 / 2) / 2, rtol=1e-6)
    assert "num_tokens" not in m
    # clip higher: eps_high 1.5 lets row 0's ratio 2 count as 2 -> -2 instead of -1.2
    loss, _ = clipped_policy_loss(LOGP, OLD, LOGP, ADV, MASK, jnp.zeros((2, 3)), clip_eps=0.2, clip_eps_high=1.5)
    np.testing.assert_allclose(loss, np.mean([-2.0, -1.0, -1.0, 2.0, 1.6]), rtol=1e-6)


def test_kl_is_k3_weighted_per_token():
    ref = jnp.log(jnp.asarray([[0.25, 0.25, 0.5], [0.4, 0.1, 0.9]]))
    coefs = jnp.asarray([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]])
    loss, m = clipped_policy_loss(LOGP, LOGP, ref, jnp.zeros((2, 3)), MASK, coefs)
    d = np.log([[0.5, 1.0, 1.0], [0.5, 1.0, 3.0]])  # ref - logp
    k3 = np.exp(d) - d - 1  # row 0 token 0: 0.5 + ln 2 - 1; row 1 token 0 the same
    np.testing.assert_allclose(m["kl"], (k3[0, 0] + k3[1, 0]) / 5, rtol=1e-5)
    np.testing.assert_allclose(loss, (0.1 * k3[0, 0] + 1.0 * k3[1, 0]) / 5, rtol=1e-5)


def test_on_policy_gradient_is_reinforce():
    """With old = stop_gradient(logp) the ratio is 1 and the gradient is that of -mean(A log pi)."""
    def ours(logp):
        return clipped_policy_loss(logp, logp, logp, ADV, MASK, jnp.zeros((2, 3)))[0]

    def reinforce(logp):
        return -jnp.sum(ADV * logp * MASK) / jnp.sum(MASK)

    np.testing.assert_allclose(jax.grad(ours)(LOGP), jax.grad(reinforce)(LOGP), rtol=1e-6)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        clipped_policy_loss(LOGP, LOGP, LOGP, ADV, MASK, jnp.zeros((2, 3)), aggregation="sum")
