"""Test-time baselines: vote and beam-selection rules on hand-made inputs, budgets and choices against an
independent recomputation on a tiny random model, and a policy that has memorised its problems."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.data.sft_data import SFTDataset
from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sampling import SamplingConfig, encode_prompts, generate
from jaxreason.search.baselines import (
    BASELINES,
    BaselineConfig,
    MethodResult,
    best_beams,
    best_of,
    group_answers,
    majority_vote,
    prm_beam_search,
    run_baseline,
    select_beams,
    weighted_vote,
)
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks import get_task
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
MODEL = ModelConfig(
    vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, eos_token_id=EOS, pad_token_id=PAD,
)
TASK = get_task("arith", max_ops=2)
PROBLEMS = TASK.problems("train", n=3, seed=1)
# One config for every test, so the random and the memorised policy share compiled programs.
CONFIG = BaselineConfig(num_samples=4, temperature=0.7, max_new_tokens=60, beam_width=2, proposals_per_beam=2,
                        max_steps=3, max_step_tokens=20)
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def policy():
    model = CausalLM(MODEL, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 default give peaked, prompt-dependent distributions.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, state))
    return model


@pytest.fixture(scope="module")
def verifier():
    model = ValueModel(MODEL, rngs=nnx.Rngs(1))
    # The head starts at zero (every value 0.5); a random one makes the scores differ.
    model.head[...] = jax.random.normal(jax.random.key(2), model.head.shape)
    return model


@pytest.fixture(scope="module")
def results(policy, verifier):
    return {name: run_baseline(name, policy, TOKENIZER, TASK, PROBLEMS, CONFIG, KEY, verifier=verifier)
            for name in BASELINES}


def _prompt_ids(problem) -> list[int]:
    return TOKENIZER.encode(TASK.prompt(problem))


def _samples(policy, config: BaselineConfig, key, k: int, temperature: float):
    """The K samples per problem drawn again with `generate` on K copies of each prompt and the documented
    row keys: tokens [B * K, N] and lengths [B * K] as numpy."""
    texts = [TASK.prompt(p) for p in PROBLEMS for _ in range(k)]
    tokens, mask = encode_prompts(TOKENIZER, texts)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=temperature, top_p=config.top_p)
    out = generate(policy, tokens, mask, jax.random.split(key, len(texts)), sampling, eos_ids=(EOS,), pad_id=PAD)
    return np.asarray(out.tokens), np.asarray(out.lengths)


# ---------------------------------------------------------------- votes and selection rules


def test_group_answers_groups_equal_answers_in_order_of_appearance():
    np.testing.assert_array_equal(group_answers(["4", None, "3.0", "4", "3"]), [0, -1, 1, 0, 1])
    np.testing.assert_array_equal(group_answers([None, None]), [-1, -1])


def test_majority_vote():
    assert majority_vote(["3", "4", "3"]) == 0
    assert majority_vote(["4", "3", "3"]) == 1  # the winner is represented by its first sample
    assert majority_vote(["4", "3", "3", "4"]) == 0  # tie: the answer seen first
    assert majority_vote([None, "5", None, None]) == 1  # no answer, no vote
    assert majority_vote([None, None]) == 0


def test_weighted_vote():
    assert weighted_vote(["3", "4", "3"], [0.1, 0.9, 0.1]) == 1
    assert weighted_vote(["3", "4", "3"], [0.5, 0.9, 0.5]) == 0
    assert weighted_vote(["3", "4", "3"], [0.2, 0.9, 0.8]) == 2  # best-scored sample of the winning answer
    assert weighted_vote(["4", "3"], [0.5, 0.5]) == 0  # tie: the answer seen first
    assert weighted_vote([None, "7"], [0.9, 0.1]) == 1
    assert weighted_vote([None, None], [0.2, 0.6]) == 1


def test_best_of():
    assert best_of([0.1, 0.9, 0.3]) == 1
    assert best_of([0.5, 0.2, 0.5]) == 0


def test_select_beams_keeps_finished_beams_and_drops_their_proposals():
    # N = 2 beams, M = 2 proposals each; beam 0 is finished, so proposals 0 and 1 do not count.
    proposals = np.array([[0.95, 0.99, 0.9, 0.2]])
    chosen = select_beams(proposals, np.array([[0.7, 0.3]]), np.array([[True, False]]), 2)
    np.testing.assert_array_equal(chosen, [[2, 4]])  # proposal 0 of beam 1, then kept beam 0
    # An open beam is replaced by its proposals even when it scored better than all of them.
    chosen = select_beams(proposals, np.array([[0.7, 1.0]]), np.array([[True, False]]), 2)
    np.testing.assert_array_equal(chosen, [[2, 4]])
    # Nothing finished: the top two proposals; equal scores keep pool order.
    chosen = select_beams(np.array([[0.5, 0.1, 0.5, 0.5]]), np.zeros((1, 2)), np.zeros((1, 2), bool), 2)
    np.testing.assert_array_equal(chosen, [[0, 2]])
    # Everything finished: the beams stay as they are, best first.
    chosen = select_beams(proposals, np.array([[0.3, 0.7]]), np.ones((1, 2), bool), 2)
    np.testing.assert_array_equal(chosen, [[5, 4]])


def test_best_beams_prefers_finished_beams():
    scores = np.array([[0.9, 0.5, 0.7], [0.2, 0.8, 0.8]])
    finished = np.array([[False, True, True], [False, False, False]])
    np.testing.assert_array_equal(best_beams(scores, finished), [2, 1])


# ---------------------------------------------------------------- the methods on a random model


def test_results_are_well_formed(results):
    b, n, m = len(PROBLEMS), CONFIG.num_samples, CONFIG.beam_width * CONFIG.proposals_per_beam
    most = {"greedy": CONFIG.max_new_tokens, "self_consistency": n * CONFIG.max_new_tokens,
            "best_of_n": n * CONFIG.max_new_tokens, "weighted_best_of_n": n * CONFIG.max_new_tokens,
            "beam_search": CONFIG.max_steps * m * CONFIG.max_step_tokens}
    assert set(results) == set(most)
    for name, r in results.items():
        assert isinstance(r, MethodResult) and r.method == name
        assert len(r.completions) == len(r.answers) == len(r.correct) == b
        assert r.answers == [TASK.extract_answer(c) for c in r.completions]
        assert r.correct == [TASK.is_correct(p, c) for p, c in zip(PROBLEMS, r.completions)]
        assert r.generated_tokens.shape == (b,) and r.generated_tokens.dtype == np.int64
        assert np.all(r.generated_tokens > 0) and np.all(r.generated_tokens <= most[name]), name
        assert r.total_tokens == int(r.generated_tokens.sum()) and 0 <= r.accuracy <= 1 and r.seconds > 0


def test_same_key_same_result_other_key_other_result(policy, verifier, results):
    for name in ("self_consistency", "beam_search"):
        again = run_baseline(name, policy, TOKENIZER, TASK, PROBLEMS, CONFIG, KEY, verifier=verifier)
        assert again.completions == results[name].completions
        np.testing.assert_array_equal(again.generated_tokens, results[name].generated_tokens)
        other = run_baseline(name, policy, TOKENIZER, TASK, PROBLEMS, CONFIG, jax.random.key(1), verifier=verifier)
        assert other.completions != results[name].completions


def test_greedy_matches_generate(policy, results):
    tokens, lengths = _samples(policy, CONFIG, KEY, 1, 0.0)
    np.testing.assert_array_equal(results["greedy"].generated_tokens, lengths)
    expected = [TOKENIZER.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(tokens, lengths)]
    assert results["greedy"].completions == expected


def test_sampled_methods_count_and_choose_like_an_independent_recomputation(policy, verifier, results):
    k = CONFIG.num_samples
    tokens, lengths = _samples(policy, CONFIG, KEY, k, CONFIG.temperature)
    for name in ("self_consistency", "best_of_n", "weighted_best_of_n"):
        np.testing.assert_array_equal(results[name].generated_tokens, lengths.reshape(-1, k).sum(1))
    # Each sample scored as prompt + completion with nothing before it: padding after a causal model's last
    # real token cannot change its value there.
    rows = [_prompt_ids(PROBLEMS[i // k]) + t[:n].tolist() for i, (t, n) in enumerate(zip(tokens, lengths))]
    right_padded = np.array([r + [PAD] * (max(map(len, rows)) - len(r)) for r in rows])
    values = jax.nn.sigmoid(verifier(jnp.asarray(right_padded)))
    scores = np.asarray(values)[np.arange(len(rows)), [len(r) - 1 for r in rows]].reshape(-1, k)
    assert np.all(np.ptp(scores, axis=1) > 1e-3)  # the verifier does separate the samples
    texts = np.array([TOKENIZER.decode(t[:n].tolist(), skip_special_tokens=True)
                      for t, n in zip(tokens, lengths)]).reshape(-1, k)
    for b in range(len(PROBLEMS)):
        answers = [TASK.extract_answer(t) for t in texts[b]]
        assert results["self_consistency"].completions[b] == texts[b][majority_vote(answers)]
        assert results["best_of_n"].completions[b] == texts[b][best_of(scores[b])]
        assert results["weighted_best_of_n"].completions[b] == texts[b][weighted_vote(answers, scores[b])]


def test_greedy_beam_search_follows_the_greedy_chain(policy, verifier):
    """At temperature 0 every proposal is the greedy next step, so the beams walk the greedy chain one step at
    a time and each step costs N * M copies of that step's tokens."""
    config = dataclasses.replace(CONFIG, temperature=0.0)
    result = prm_beam_search(policy, verifier, TOKENIZER, TASK, PROBLEMS, config, KEY)
    assert config.max_new_tokens >= config.max_steps * config.max_step_tokens  # the chain covers every step
    chain, chain_lengths = _samples(policy, config, KEY, 1, 0.0)
    newline = TOKENIZER.convert_tokens_to_ids("\n")
    for b in range(len(PROBLEMS)):
        ids = chain[b, : chain_lengths[b]].tolist()
        used = 0
        for _ in range(config.max_steps):
            step = ids[used: used + config.max_step_tokens]
            ends = [i for i, t in enumerate(step) if t in (newline, EOS)]
            step = step[: ends[0] + 1] if ends else step
            used += len(step)
            if step[-1] == EOS or TASK.is_final_step(TOKENIZER.decode(step, skip_special_tokens=True)):
                break
        assert result.generated_tokens[b] == config.beam_width * config.proposals_per_beam * used
        assert result.completions[b] == TOKENIZER.decode(ids[:used], skip_special_tokens=True)


def test_run_baseline_rejects_unknown_names_and_a_missing_verifier(policy):
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("tree_of_thought", policy, TOKENIZER, TASK, PROBLEMS, CONFIG, KEY)
    with pytest.raises(ValueError, match="needs a verifier"):
        run_baseline("beam_search", policy, TOKENIZER, TASK, PROBLEMS, CONFIG, KEY)


def test_config_validation():
    with pytest.raises(ValueError, match="beam_width"):
        BaselineConfig(beam_width=0)
    with pytest.raises(ValueError, match="top_p"):
        BaselineConfig(top_p=0.0)


# ---------------------------------------------------------------- a policy that knows the answers


@pytest.fixture(scope="module")
def memorised_policy():
    """The tiny model trained on the gold solutions of PROBLEMS until it reproduces them."""
    records = [{"prompt": TASK.prompt(p), "completion": TASK.format_solution(p.solution_steps, p.answer)}
               for p in PROBLEMS]
    data = SFTDataset(TOKENIZER, records, max_len=80)
    batch = data.batch(range(len(data)))
    model = CausalLM(MODEL, rngs=nnx.Rngs(3))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=10, total_steps=150, weight_decay=0))
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh)
    for _ in range(150):
        state, metrics = step(state, batch)
    assert float(metrics["accuracy"]) == 1.0
    # Uncommitted on the default device, as the random policy's are, so the baselines' programs are reused.
    nnx.update(model, jax.tree.map(jnp.asarray, jax.device_get(state.trainable)))
    return model


def test_memorised_policy_solves_its_problems_with_every_method(memorised_policy, verifier):
    gold_tokens = np.array([len(TASK.format_solution(p.solution_steps, p.answer)) + 1 for p in PROBLEMS])  # + EOS
    per_problem = {"greedy": 1, "self_consistency": CONFIG.num_samples, "best_of_n": CONFIG.num_samples,
                   "weighted_best_of_n": CONFIG.num_samples,
                   "beam_search": CONFIG.beam_width * CONFIG.proposals_per_beam}
    for name in BASELINES:
        result = run_baseline(name, memorised_policy, TOKENIZER, TASK, PROBLEMS, CONFIG, KEY, verifier=verifier)
        assert result.correct == [True] * len(PROBLEMS), (name, result.completions)
        assert result.answers == [p.answer for p in PROBLEMS]
        np.testing.assert_array_equal(result.generated_tokens, per_problem[name] * gold_tokens)
