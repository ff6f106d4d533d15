"""Every advantage estimator against numbers worked out by hand in the comments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.rl.advantages import (
    gae,
    get_advantage,
    group_normalized,
    leave_one_out,
    per_token,
    register_advantage,
    step_advantages,
)

# ---------------------------------------------------------------- group estimators


def test_grpo_by_hand():
    # [1, 0, 0, 1]: mean 0.5, centred [0.5, -0.5, -0.5, 0.5], std sqrt(4 * 0.25 / 4) = 0.5 -> [1, -1, -1, 1]
    # [1, 1, 1, 1]: every reward equal -> 0
    # [0, 0, 0, 2]: mean 0.5, centred [-0.5, -0.5, -0.5, 1.5], std sqrt((3 * 0.25 + 2.25) / 4) = sqrt(0.75)
    #               = 0.8660254 -> -0.5 / 0.8660254 = -0.5773503, 1.5 / 0.8660254 = 1.7320508
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    out = group_normalized(rewards, eps=0.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[1, -1, -1, 1], [0, 0, 0, 0], [-0.5773503, -0.5773503, -0.5773503, 1.7320508]],
                               rtol=1e-6)
    # the default eps = 1e-6: 0.5 / (0.5 + 1e-6) = 0.999998
    np.testing.assert_allclose(group_normalized(rewards)[0], [0.999998, -0.999998, -0.999998, 0.999998], rtol=1e-6)


def test_dr_grpo_only_centres():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    expected = [[0.5, -0.5, -0.5, 0.5], [-0.5, -0.5, -0.5, 1.5]]
    np.testing.assert_allclose(group_normalized(rewards, scale_by_std=False), expected, rtol=1e-6)
    np.testing.assert_allclose(get_advantage("dr_grpo")(rewards), expected, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_equal_group_is_exactly_zero(eps, scale_by_std):
    # 0.1 * 3 / 3 is not 0.1 in float32, so a plain r - mean would leave a rounding residue (then / 0 = inf)
    rewards = jnp.array([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.0, 0.0, 0.0]])
    out = jax.jit(lambda r: group_normalized(r, scale_by_std=scale_by_std, eps=eps))(rewards)
    assert np.all(np.asarray(out) == 0.0)
    assert np.all(np.asarray(group_normalized(jnp.array([[5.0]]), eps=eps)) == 0.0)  # a group of one


def test_rloo_by_hand():
    # [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - (1 + 0 + 1) / 3 = -2/3, and so on
    # [0, 0, 0, 2]: A_0 = 0 - (0 + 0 + 2) / 3 = -2/3, A_3 = 2 - 0 = 2
    # [3, 1]:       A_0 = 3 - 1 = 2, A_1 = 1 - 3 = -2
    out = leave_one_out(jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(out, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-2 / 3, -2 / 3, -2 / 3, 2], [0, 0, 0, 0]],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(get_advantage("rloo")(jnp.array([[3.0, 1.0]])), [[2, -2]])


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="G >= 2"):
        leave_one_out(jnp.ones((3, 1)))


def test_registry():
    assert get_advantage("grpo") is group_normalized
    with pytest.raises(ValueError, match=r"unknown advantage 'nope' \(known: dr_grpo, grpo, rloo"):
        get_advantage("nope")
    with pytest.raises(ValueError, match="registered already"):
        register_advantage("grpo", leave_one_out)
    register_advantage("test_centre_only", get_advantage("dr_grpo"))
    np.testing.assert_allclose(get_advantage("test_centre_only")(jnp.array([[2.0, 0.0]])), [[1, -1]])


def test_group_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"rewards must be \[N, G\]"):
        group_normalized(jnp.ones(4))
    with pytest.raises(ValueError, match=r"rewards must be \[N, G\]"):
        leave_one_out(jnp.ones((2, 2, 2)))


# ---------------------------------------------------------------- per-step and per-token


def test_step_advantages_by_hand():
    # row 0: Q = 0.2 (prompt), 0.5, 0.4, 1.0 after steps 1..3 -> A = 0.5 - 0.2, 0.4 - 0.5, 1.0 - 0.4
    # row 1: one step, Q 0.6 -> 0.9; steps 2 and 3 do not exist (their prefix values are junk) -> 0
    prefix_values = jnp.array([[0.2, 0.5, 0.4, 1.0], [0.6, 0.9, 7.0, 7.0]])
    step_mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(step_advantages(prefix_values, step_mask), [[0.3, -0.1, 0.6], [0.3, 0, 0]], atol=1e-6)


def test_step_advantages_shape_errors():
    with pytest.raises(ValueError, match="prefix_values has shape"):
        step_advantages(jnp.zeros((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"step_mask must be \[B, S\]"):
        step_advantages(jnp.zeros((2, 4)), jnp.ones(3))


def test_per_token_on_a_multi_turn_layout():
    # two turns per episode; -1 marks the prompt, the instruction between the attempts and padding
    turn_values = jnp.array([[0.0, 1.0], [0.5, -0.25]])
    token_turn = jnp.array([[-1, -1, 0, 0, -1, 1, 1, -1],
                            [-1, 0, -1, -1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(per_token(turn_values, token_turn),
                                  [[0, 0, 0, 0, 0, 1, 1, 0],
                                   [0, 0.5, 0, 0, -0.25, -0.25, -0.25, -0.25]])
    out = per_token(turn_values, token_turn, fill=-9.0)
    np.testing.assert_array_equal(out[0], [-9, -9, 0, 0, -9, 1, 1, -9])
    # one value per sequence (K = 1): the sequence advantage on its response tokens
    np.testing.assert_array_equal(per_token(jnp.array([[2.0], [-1.0]]), jnp.array([[-1, 0, 0], [-1, -1, 0]])),
                                  [[0, 2, 2], [0, 0, -1]])


def test_per_token_shape_errors():
    with pytest.raises(ValueError, match="values has 2 rows but segment has 3"):
        per_token(jnp.zeros((2, 1)), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"segment must be \[B, T\]"):
        per_token(jnp.zeros((2, 1)), jnp.zeros(4, jnp.int32))


# ---------------------------------------------------------------- GAE

# row 0: prompt at t = 0, response at t = 1..3, padding at t = 4; reward 1 on the last response token.
# row 1: response t = 1, 2 (attempt 1, reward 0.5), an instruction at t = 3, 4 (its reward 7 must be ignored),
#        response t = 5, 6 (attempt 2, reward 1), padding t = 7. Values 9 sit on positions the mask excludes.
REWARDS = jnp.array([[0, 0, 0, 1, 0, 0, 0, 0],
                     [0, 0, 0.5, 7, 0, 0, 1, 0]], jnp.float32)
VALUES = jnp.array([[9, 0.5, 0.6, 0.8, 9, 9, 9, 9],
                    [9, 0.4, 0.5, 9, 9, 0.7, 0.9, 9]], jnp.float32)
MASK = jnp.array([[0, 1, 1, 1, 0, 0, 0, 0],
                  [0, 1, 1, 0, 0, 1, 1, 0]])


def test_gae_by_hand():
    # gamma 0.9, lam 0.8 (gamma lam = 0.72); "next" is the next masked token, 0 after the last
    # row 0: t3: delta = 1 + 0 - 0.8 = 0.2                 A = 0.2
    #        t2: delta = 0 + 0.9 * 0.8 - 0.6 = 0.12        A = 0.12 + 0.72 * 0.2 = 0.264
    #        t1: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04        A = 0.04 + 0.72 * 0.264 = 0.23008
    # row 1: t6: delta = 1 + 0 - 0.9 = 0.1                 A = 0.1
    #        t5: delta = 0 + 0.9 * 0.9 - 0.7 = 0.11        A = 0.11 + 0.72 * 0.1 = 0.182
    #        t2: delta = 0.5 + 0.9 * 0.7 - 0.5 = 0.63      A = 0.63 + 0.72 * 0.182 = 0.76104  (jumps t3, t4)
    #        t1: delta = 0 + 0.9 * 0.5 - 0.4 = 0.05        A = 0.05 + 0.72 * 0.76104 = 0.5979488
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(advantages, [[0, 0.23008, 0.264, 0.2, 0, 0, 0, 0],
                                            [0, 0.5979488, 0.76104, 0, 0, 0.182, 0.1, 0]], atol=1e-6)
    # returns = A + V on the mask
    np.testing.assert_allclose(returns, [[0, 0.73008, 0.864, 1.0, 0, 0, 0, 0],
                                         [0, 0.9979488, 1.26104, 0, 0, 0.882, 1.0, 0]], atol=1e-6)


def test_gae_lambda_zero_is_td0():
    # returns = r_t + gamma V_next: row 0: t3 1 + 0, t2 0.9 * 0.8 = 0.72, t1 0.9 * 0.6 = 0.54
    #                               row 1: t6 1, t5 0.9 * 0.9 = 0.81, t2 0.5 + 0.9 * 0.7 = 1.13, t1 0.9 * 0.5 = 0.45
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.0)
    np.testing.assert_allclose(returns, [[0, 0.54, 0.72, 1, 0, 0, 0, 0],
                                         [0, 0.45, 1.13, 0, 0, 0.81, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(advantages, [[0, 0.04, 0.12, 0.2, 0, 0, 0, 0],
                                            [0, 0.05, 0.63, 0, 0, 0.11, 0.1, 0]], atol=1e-6)


def test_gae_lambda_one_is_monte_carlo():
    # returns = discounted reward-to-go over the masked tokens, whatever the values:
    # gamma 0.9, row 0: t3 1, t2 0.9, t1 0.81;  row 1: t6 1, t5 0.9, t2 0.5 + 0.9 * 0.9 = 1.31, t1 0.9 * 1.31 = 1.179
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=1.0)
    np.testing.assert_allclose(returns, [[0, 0.81, 0.9, 1, 0, 0, 0, 0],
                                         [0, 1.179, 1.31, 0, 0, 0.9, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(advantages, [[0, 0.31, 0.3, 0.2, 0, 0, 0, 0],
                                            [0, 0.779, 0.81, 0, 0, 0.2, 0.1, 0]], atol=1e-6)
    # gamma = lam = 1 (the defaults): undiscounted sums, row 1: 1.5, 1.5, 1, 1 (the 7 at t3 is not counted)
    _, returns = jax.jit(gae)(REWARDS, VALUES, MASK)
    np.testing.assert_allclose(returns[1], [0, 1.5, 1.5, 0, 0, 1, 1, 0], atol=1e-6)


def test_gae_shape_errors():
    with pytest.raises(ValueError, match="values has shape"):
        gae(REWARDS, VALUES[:, :-1], MASK)
    with pytest.raises(ValueError, match="mask has shape"):
        gae(REWARDS, VALUES, MASK[:1])
    with pytest.raises(ValueError, match=r"rewards must be \[B, T\]"):
        gae(REWARDS[0], VALUES[0], MASK[0])
