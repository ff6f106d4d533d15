"""Monte Carlo prefix values against continuations drawn by hand, and their per-step advantages on the tokens."""

import jax
import numpy as np

from jaxreason.rl.advantages import per_token, step_advantages
from jaxreason.rl.prefix_values import prefix_values, step_index
from jaxreason.rl.rollouts import sample_episodes
from jaxreason.sampling import SamplingConfig, generate, pad_left
from jaxreason.tasks.base import Problem
from jaxreason.verifiers.positions import StepSplitter
from tests.tiny import EOS, PAD, TOKENIZER, policy

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
SPLIT = StepSplitter(TOKENIZER, "\n")


def _has_seven(problems, prompts, completions):
    return [float("7" in TOKENIZER.decode(list(c), skip_special_tokens=True)) for c in completions]


def test_greedy_prefix_values_are_the_rewards_of_the_greedy_continuations():
    model = policy(5)
    prompts = [TOKENIZER.encode("Q: 3 + 4\n")]
    completions = [TOKENIZER.encode("1 + 6 = 7\n2 + 2 = 4\n") + [EOS]]
    problems = [Problem(id="p", question="3 + 4", answer="7")]
    values = prefix_values(model, _has_seven, SPLIT, problems, prompts, completions, num_rollouts=2,
                           sampling=GREEDY, key=jax.random.key(0), eos_ids=(EOS,), pad_id=PAD)
    ends = values.step_ends[0]
    np.testing.assert_array_equal(ends, [10, 20, 21])  # two lines, then the EOS as a last step
    expected = []
    for end in [0, *ends[:-1]]:
        tokens, mask = pad_left([prompts[0] + completions[0][:end]], PAD)
        out = generate(model, tokens, mask, jax.random.key(0), GREEDY, eos_ids=(EOS,), pad_id=PAD)
        tail = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
        expected.append(_has_seven(None, None, [completions[0][:end] + tail])[0])
    np.testing.assert_array_equal(values.values[0], [*expected, 1.0])  # the whole solution has a 7
    assert values.generated_tokens > 0
    padded, mask = values.padded()
    advantages = step_advantages(padded, mask)
    np.testing.assert_allclose(advantages[0], np.diff(values.values[0]), atol=1e-6)


def test_step_index_spreads_per_step_values_over_each_steps_tokens():
    model = policy(5)
    prompts = [TOKENIZER.encode("Q: 1\n")]
    episodes = sample_episodes(model, prompts, jax.random.key(0), GREEDY, group_size=1, eos_ids=(EOS,), pad_id=PAD)
    completion = episodes.attempt(0)[0]
    ends = np.asarray([3, len(completion)]) if len(completion) > 3 else np.asarray([len(completion)])
    index = step_index(episodes, [ends])
    start = len(prompts[0])
    steps = index[0, start:start + len(completion)]
    np.testing.assert_array_equal(steps, np.searchsorted(ends, np.arange(len(completion)), side="right"))
    assert np.all(index[0, :start] < 0) and np.all(index[0, start + len(completion):] < 0)
    tokens = per_token(np.asarray([[0.5, -0.25]])[:, :len(ends)], index)
    np.testing.assert_array_equal(np.asarray(tokens)[0, start:start + min(3, len(completion))], 0.5)
