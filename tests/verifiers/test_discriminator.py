"""rStar's mutual-consistency discriminator: the masking and the agreement rule through a scripted stand-in for
`generate`, batching invariance on a random tiny model, and a model that has memorised its problems agreeing
with right candidates and not with a wrong one."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from tiny import TOKENIZER

from jaxreason.models.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from jaxreason.sampling import SamplingConfig
from jaxreason.tasks import get_task
from jaxreason.verifiers import discriminator
from jaxreason.verifiers.discriminator import (
    Candidate,
    DiscriminatorConfig,
    check_consistency,
    is_consistent,
    prefix_lengths,
)

TASK = get_task("arith", max_ops=2)
PROBLEMS = TASK.problems("train", n=3, seed=1)  # 3 * 4, 5 * 9 + 7, 7 - 6
KEY = jax.random.key(0)
# One sampling setting and batch size for the model tests, so they share compiled programs.
CONFIG = DiscriminatorConfig(sampling=SamplingConfig(max_new_tokens=48, temperature=1.0), batch_size=8)


def _gold(p) -> str:
    return TASK.format_solution(p.solution_steps, p.answer)


# Right (3 * 4, 5 * 9 + 7), wrong after the last masked prefix (53 for 52: every prefix up to half the solution is
# still right), and without an answer.
CANDIDATES = [
    Candidate(TASK.prompt(PROBLEMS[0]), _gold(PROBLEMS[0]), "12"),
    Candidate(TASK.prompt(PROBLEMS[1]), "5 * 9 = 45\n45 + 7 = 53\nThe answer is 53", "53"),
    Candidate(TASK.prompt(PROBLEMS[1]), _gold(PROBLEMS[1]), "52"),
    Candidate(TASK.prompt(PROBLEMS[2]), "7 - 6 = 1", None),
]


def test_is_consistent():
    table = {  # agreeing of 4: (loose, mid, strict)
        0: (False, False, False), 1: (True, False, False), 2: (True, True, False), 3: (True, True, False),
        4: (True, True, True),
    }
    for agreeing, expected in table.items():
        assert tuple(is_consistent(agreeing, 4, rule) for rule in ("loose", "mid", "strict")) == expected
    assert is_consistent(1, 3, "mid") and not is_consistent(0, 1, "mid")  # 3 // 2 = 1; never with none agreeing
    with pytest.raises(ValueError, match="rule"):
        is_consistent(1, 4, "median")


def test_prefix_lengths():
    assert prefix_lengths(10, (0.2, 0.3, 0.4, 0.5)) == [2, 3, 4, 5]
    assert prefix_lengths(3, (0.2, 0.3, 0.4, 0.5)) == [1, 1, 1, 2]  # at least one token
    assert prefix_lengths(0, (0.2, 0.5)) == [0, 0]


class ScriptedSampler:
    """Stands in for the discriminator's sampler: each row's completion is "The answer is k", k the row's prefix
    tokens; records every call's prompt numbers, prefixes and keys."""

    def __init__(self):
        self.calls = []

    def __call__(self, graphdef, state, prompts, last_hidden, head, tails, tail_len, keys, stop_table, *, sampling,
                 eos_ids, pad_id):
        self.calls.append((np.asarray(head), np.asarray(tails), np.asarray(tail_len), keys))
        ids = [TOKENIZER.encode(f"The answer is {int(n)}", add_special_tokens=False) for n in np.asarray(tail_len)]
        out = np.full((len(ids), sampling.max_new_tokens), pad_id, np.int32)
        for i, row in enumerate(ids):
            out[i, :len(row)] = row
        return types.SimpleNamespace(tokens=out, lengths=np.array([len(r) for r in ids]))


def _scripted(monkeypatch, candidates, **config):
    fake = ScriptedSampler()
    monkeypatch.setattr(discriminator, "_sample_rows", fake)
    result = check_consistency(candidates, model=tiny.policy(), tokenizer=TOKENIZER, task=TASK,
                               config=DiscriminatorConfig(**config), key=KEY)
    return result, fake.calls


def test_masking_keeps_each_ratios_prefix_in_fixed_shape_batches(monkeypatch):
    trajectories = ["abcdefghij", "xyz", "", "0123456789" * 9]
    candidates = [Candidate("Q: x\n", t, "1") for t in trajectories]
    candidates.insert(1, Candidate("Q: x\n", "skipped", None))
    candidates.append(Candidate("Q: y\n", "uvw", "2"))  # another prompt: prefilled beside the first
    result, calls = _scripted(monkeypatch, candidates, batch_size=3)
    assert all(tails.shape[0] == 3 and tails.shape[1] % 64 == 0 for _, tails, _, _ in calls)
    assert len({tails.shape for _, tails, _, _ in calls}) == 1  # one width for every call
    rows = [(int(h), list(t[:n])) for heads, tails, lens, _ in calls for h, t, n in zip(heads, tails, lens)]
    keys = jnp.concatenate([jax.random.key_data(k) for *_, k in calls])
    expected, row_numbers = [], []
    for c, cand in enumerate(candidates):
        if cand.answer is None:
            continue
        traj = TOKENIZER.encode(cand.trajectory, add_special_tokens=False)
        for j, r in enumerate(CONFIG.ratios):
            k = max(1, round(r * len(traj))) if traj else 0
            expected.append((0 if cand.prompt == "Q: x\n" else 1, traj[:k]))
            row_numbers.append(c * 4 + j)
    assert rows[:len(expected)] == expected  # then copies of the last row fill the last batch
    want_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(KEY, i)) for i in row_numbers])
    np.testing.assert_array_equal(keys[:len(expected)], want_keys)
    assert result.model_calls == 20 and result.completions[1] == [] and not result.consistent[1]
    assert result.completions[0] == [f"The answer is {k}" for k in (2, 3, 4, 5)]
    assert result.generated_tokens == sum(len(c) for row in result.completions for c in row)


def test_ids_number_the_candidates_draws(monkeypatch):
    candidates = [Candidate("Q: x\n", "abcd", "1"), Candidate("Q: x\n", "efgh", "1")]
    fake = ScriptedSampler()
    monkeypatch.setattr(discriminator, "_sample_rows", fake)
    check_consistency(candidates[1:], model=tiny.policy(), tokenizer=TOKENIZER, task=TASK, config=CONFIG, key=KEY,
                      ids=[1])
    keys = jax.random.key_data(fake.calls[0][3])[:4]
    np.testing.assert_array_equal(keys, jnp.stack([jax.random.key_data(jax.random.fold_in(KEY, 4 + j))
                                                   for j in range(4)]))


@pytest.mark.parametrize("rule, expected", [
    ("loose", [True, True, True, True, False]),
    ("mid", [True, True, True, False, False]),
    ("strict", [True, False, False, False, False]),
])
def test_rule_on_scripted_completions(monkeypatch, rule, expected):
    # Prefix lengths: 1 token -> [1, 1, 1, 1]; 3 -> [1, 1, 1, 2]; 4 -> [1, 1, 2, 2]; 10 -> [2, 3, 4, 5].
    cases = [("a", "1"), ("abc", "1"), ("abcd", "1"), ("abc", "2"), ("abcdefghij", "9")]
    result, _ = _scripted(monkeypatch, [Candidate("Q: x\n", t, a) for t, a in cases], rule=rule)
    assert result.agreeing == [4, 3, 2, 1, 0]
    assert result.consistent == expected


def _check(model, candidates=CANDIDATES, config=CONFIG, key=KEY):
    return check_consistency(candidates, model=model, tokenizer=TOKENIZER, task=TASK, config=config, key=key)


def test_random_model_batching_invariance_and_skipped_candidate():
    model = tiny.policy()
    small = _check(model, config=DiscriminatorConfig(sampling=CONFIG.sampling, batch_size=2))
    large = _check(model)
    assert small.completions == large.completions and small.generated_tokens == large.generated_tokens
    assert large.model_calls == 12 and [len(c) for c in large.completions] == [4, 4, 4, 0]
    assert large.consistent == [False] * 4  # a random model reaches no answer
    assert _check(model, key=jax.random.key(1)).completions != large.completions


@pytest.fixture(scope="module")
def memorised_model():
    """The tiny model trained on the gold solutions of PROBLEMS until it reproduces them."""
    return tiny.memorise(tiny.policy(seed=3), TOKENIZER, TASK, PROBLEMS, steps=200)


def test_memorised_model_agrees_with_right_candidates_only(memorised_model):
    result = _check(memorised_model)
    assert result.agreeing == [4, 0, 4, 0]
    assert result.consistent == [True, False, True, False]
    # Every completion of a prefix of problem 2's solution is its gold rest, whatever the candidate said after.
    traj = TOKENIZER.encode(_gold(PROBLEMS[1]), add_special_tokens=False)
    for k, text in zip(prefix_lengths(len(traj), CONFIG.ratios), result.completions[1]):
        assert TOKENIZER.decode(traj[:k]) + text == _gold(PROBLEMS[1])


def test_tokenizer_mismatch():
    swapped = build_char_tokenizer("10" + DEFAULT_ALPHABET[2:])  # '0' and '1' trade ids
    with pytest.raises(ValueError, match="differs from the generator's: token ids '0': 4 vs 5, '1': 5 vs 4$"):
        check_consistency(CANDIDATES, model=None, tokenizer=TOKENIZER, task=TASK, config=CONFIG, key=KEY,
                          generator_tokenizer=swapped)
    with pytest.raises(ValueError, match="differs from the generator's: 100 vs 40 tokens"):
        check_consistency(CANDIDATES, model=None, tokenizer=TOKENIZER, task=TASK, config=CONFIG, key=KEY,
                          generator_tokenizer=build_char_tokenizer("0123456789" + "abcdefghijklmnopqrstuvwxyz"))


@pytest.mark.parametrize("kwargs, key", [
    (dict(ratios=()), "ratios"), (dict(ratios=(0.2, 1.0)), "ratios"), (dict(ratios=(0.0,)), "ratios"),
    (dict(rule="median"), "rule"), (dict(completions_per_mask=0), "completions_per_mask"),
    (dict(batch_size=0), "batch_size"),
])
def test_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DiscriminatorConfig(**kwargs)
