"""Episodes from the jitted sampler: the layout of one and of two attempts, and what each attempt was drawn from."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxreason.rl.rollouts import NOT_TRAINED, sample_episodes
from jaxreason.sampling import SamplingConfig, generate, pad_left
from tests.tiny import EOS, PAD, TOKENIZER, policy

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
PROMPTS = [TOKENIZER.encode("Q: 1 + 2\n"), TOKENIZER.encode("Q: 10 * 3\n")]
INSTRUCTION = TOKENIZER.encode("Check it.\n")


@pytest.fixture(scope="module")
def model():
    return policy(3)


def _greedy_continuation(model, ids):
    tokens, mask = pad_left([ids], PAD)
    out = generate(model, tokens, mask, jax.random.key(0), GREEDY, eos_ids=(EOS,), pad_id=PAD)
    return np.asarray(out.tokens[0, :int(out.lengths[0])])


def test_one_attempt_layout(model):
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    ep = sample_episodes(model, PROMPTS, jax.random.key(1), sampling, group_size=3, eos_ids=(EOS,), pad_id=PAD)
    assert ep.tokens.shape == (6, 64) and ep.num_turns == 1
    np.testing.assert_array_equal(ep.prompt_index, [0, 0, 0, 1, 1, 1])
    for r in range(6):
        prompt = PROMPTS[r // 3]
        n = int(ep.turn_lengths[r, 0])
        np.testing.assert_array_equal(ep.tokens[r, :len(prompt)], prompt)
        np.testing.assert_array_equal(ep.token_turn[r, :len(prompt)], NOT_TRAINED)
        np.testing.assert_array_equal(ep.token_turn[r, len(prompt):len(prompt) + n], 0)
        np.testing.assert_array_equal(ep.token_turn[r, len(prompt) + n:], NOT_TRAINED)
        assert ep.attention_mask[r].sum() == len(prompt) + n
        np.testing.assert_array_equal(ep.attempt(0)[r], ep.tokens[r, len(prompt):len(prompt) + n])
        assert np.all(ep.logprobs[r, len(prompt):len(prompt) + n] < 0)
        assert bool(ep.truncated[r, 0]) == (n == 8 and ep.tokens[r, len(prompt) + n - 1] != EOS)
    # the G samples of a prompt differ (their own keys), and a run is reproducible
    again = sample_episodes(model, PROMPTS, jax.random.key(1), sampling, group_size=3, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(ep.tokens, again.tokens)
    assert len({ep.tokens[r].tobytes() for r in range(3)}) > 1


def test_ignore_eos_truncates_every_row(model):
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    ep = sample_episodes(model, PROMPTS, jax.random.key(0), sampling, group_size=2, eos_ids=(EOS,), pad_id=PAD)
    assert np.all(ep.turn_lengths == 8) and np.all(ep.truncated)
    assert ep.loss_mask().sum() == 4 * 8


def test_second_attempt_is_conditioned_on_the_first_and_the_instruction(model):
    ep = sample_episodes(model, PROMPTS, jax.random.key(0), GREEDY, group_size=2, eos_ids=(EOS,), pad_id=PAD,
                         instructions=[INSTRUCTION])
    assert ep.num_turns == 2 and ep.turn_lengths.shape == (4, 2)
    for r in range(4):
        prompt = PROMPTS[r // 2]
        first = _greedy_continuation(model, prompt)
        np.testing.assert_array_equal(ep.attempt(0)[r], first)
        second = _greedy_continuation(model, [*prompt, *first, *INSTRUCTION])
        np.testing.assert_array_equal(ep.attempt(1)[r], second)
        row = [*prompt, *first, *INSTRUCTION, *second]
        np.testing.assert_array_equal(ep.tokens[r, :len(row)], row)
        turns = [NOT_TRAINED] * len(prompt) + [0] * len(first) + [NOT_TRAINED] * len(INSTRUCTION) + [1] * len(second)
        np.testing.assert_array_equal(ep.token_turn[r, :len(row)], turns)


def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="group_size"):
        sample_episodes(model, PROMPTS, jax.random.key(0), GREEDY, group_size=0, eos_ids=(EOS,), pad_id=PAD)
    with pytest.raises(ValueError, match="does not fit width 8"):
        sample_episodes(model, PROMPTS, jax.random.key(0), GREEDY, group_size=1, eos_ids=(EOS,), pad_id=PAD, width=8)


def test_rollouts_split_over_eight_devices_equal_one_device(model):
    from jaxreason import sharding

    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    prompts = PROMPTS * 4  # 8 prompts: one per device
    args = (prompts, jax.random.key(2), sampling)
    one = sample_episodes(model, *args, group_size=2, eos_ids=(EOS,), pad_id=PAD)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    eight = sample_episodes(model, *args, group_size=2, eos_ids=(EOS,), pad_id=PAD, mesh=mesh)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)
