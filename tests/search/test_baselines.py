"""Test-time baselines: vote and beam-selection rules on hand-made inputs, the method registry and `run`/`compare`,
budgets and choices against an independent recomputation on a tiny random model, and a policy that has memorised
its problems."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import memorise

from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sampling import SamplingConfig, generate, pad_left, prompt_ids
from jaxreason.search import methods
from jaxreason.search.baselines import beam_search, best_beams, select_beams
from jaxreason.search.config import BaselineConfig, Budget, MCTSConfig
from jaxreason.search.methods import MethodResult, compare, method_names, needs_verifier, register_method, run
from jaxreason.search.votes import best_of, group_answers, majority_vote, weighted_vote
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
MODEL = ModelConfig(
    vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, eos_token_id=EOS, pad_token_id=PAD,
)
TASK = get_task("arith", max_ops=2)
PROBLEMS = TASK.problems("train", n=3, seed=1)
# One config for every test, so the random and the memorised policy share compiled programs.
CONFIG = BaselineConfig(num_samples=4, sampling=SamplingConfig(max_new_tokens=60, temperature=0.7), beam_width=2,
                        proposals_per_beam=2, max_steps=3, max_step_tokens=20)
SEARCH = MCTSConfig(num_simulations=4, num_candidates=2, max_depth=3,
                    sampling=SamplingConfig(max_new_tokens=20, temperature=0.7))
BUDGET = Budget(baseline=CONFIG, mcts=SEARCH)
BASELINES = ("greedy", "self_consistency", "best_of_n", "weighted_best_of_n", "beam_search")
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def policy():
    model = CausalLM(MODEL, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 default give peaked, prompt-dependent distributions.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, state))
    return model


@pytest.fixture(scope="module")
def value_model():
    model = ValueModel(MODEL, rngs=nnx.Rngs(1))
    # The head starts at zero (every value 0.5); a random one makes the scores differ.
    model.head[...] = jax.random.normal(jax.random.key(2), model.head.shape)
    return model


@pytest.fixture(scope="module")
def verifier(value_model):
    return ValueVerifier(value_model)


def solve(name, policy, verifier=None, budget=BUDGET, key=KEY):
    return run(name, PROBLEMS, policy=policy, verifier=verifier, tokenizer=TOKENIZER, task=TASK, budget=budget,
               key=key)


@pytest.fixture(scope="module")
def results(policy, verifier):
    """Every baseline and MCTS through `run`, on the random policy."""
    return {name: solve(name, policy, verifier) for name in (*BASELINES, "mcts")}


def _prompt_ids(problem) -> list[int]:
    return prompt_ids(TOKENIZER, TASK.prompt(problem))


def _samples(policy, config: BaselineConfig, key, k: int, temperature: float):
    """The K samples per problem drawn again with `generate` on K copies of each prompt (as the methods build
    them: `prompt_ids`) and the documented row keys: tokens [B * K, N] and lengths [B * K] as numpy."""
    tokens, mask = pad_left([_prompt_ids(p) for p in PROBLEMS for _ in range(k)], PAD)
    sampling = dataclasses.replace(config.sampling, temperature=temperature)
    out = generate(policy, jnp.asarray(tokens), jnp.asarray(mask), jax.random.split(key, len(tokens)), sampling,
                   eos_ids=(EOS,), pad_id=PAD)
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
    longest = CONFIG.sampling.max_new_tokens
    nodes = SEARCH.num_simulations + 1
    most = {"greedy": longest, "self_consistency": n * longest, "best_of_n": n * longest,
            "weighted_best_of_n": n * longest, "beam_search": CONFIG.max_steps * m * CONFIG.max_step_tokens,
            "mcts": nodes * (1 + SEARCH.rollout_steps) * SEARCH.num_candidates * SEARCH.max_step_tokens}
    assert set(results) == set(most)
    for name, r in results.items():
        assert isinstance(r, MethodResult) and r.method == name
        assert len(r.completions) == len(r.answers) == len(r.correct) == b
        assert r.answers == [TASK.extract_answer(c) for c in r.completions]
        assert r.correct == [TASK.is_correct(p, c) for p, c in zip(PROBLEMS, r.completions)]
        for counts in (r.generated_tokens, r.verifier_tokens):
            assert counts.shape == (b,) and counts.dtype == np.int64, name
        assert np.all(r.generated_tokens > 0) and np.all(r.generated_tokens <= most[name]), name
        if needs_verifier(name):
            assert np.all(r.verifier_tokens > 0), name
        else:
            assert np.all(r.verifier_tokens == 0), name
        assert r.total_tokens == int(r.generated_tokens.sum()) and 0 <= r.accuracy <= 1 and r.seconds > 0
        assert r.total_verifier_tokens == int(r.verifier_tokens.sum())


def test_same_key_same_result_other_key_other_result(policy, verifier, results):
    for name in ("self_consistency", "beam_search"):
        again = solve(name, policy, verifier)
        assert again.completions == results[name].completions
        np.testing.assert_array_equal(again.generated_tokens, results[name].generated_tokens)
        np.testing.assert_array_equal(again.verifier_tokens, results[name].verifier_tokens)
        other = solve(name, policy, verifier, key=jax.random.key(1))
        assert other.completions != results[name].completions


def test_sampling_methods_split_over_a_mesh_draw_the_same(policy, verifier, results):
    """Given a mesh, the sampling baselines split their prompts over its devices (here one per problem) and read
    the weights placed by the rules: the same completions and counts."""
    mesh = make_mesh(MeshConfig(data=len(PROBLEMS)), jax.devices()[:len(PROBLEMS)])
    for name in ("greedy", "self_consistency", "best_of_n"):
        split = run(name, PROBLEMS, policy=policy, verifier=verifier, tokenizer=TOKENIZER, task=TASK, budget=BUDGET,
                    key=KEY, mesh=mesh)
        assert split.completions == results[name].completions, name
        np.testing.assert_array_equal(split.generated_tokens, results[name].generated_tokens)


def test_greedy_matches_generate(policy, results):
    tokens, lengths = _samples(policy, CONFIG, KEY, 1, 0.0)
    np.testing.assert_array_equal(results["greedy"].generated_tokens, lengths)
    expected = [TOKENIZER.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(tokens, lengths)]
    assert results["greedy"].completions == expected


def test_sampled_methods_count_and_choose_like_an_independent_recomputation(policy, value_model, results):
    k = CONFIG.num_samples
    tokens, lengths = _samples(policy, CONFIG, KEY, k, CONFIG.sampling.temperature)
    for name in ("self_consistency", "best_of_n", "weighted_best_of_n"):
        np.testing.assert_array_equal(results[name].generated_tokens, lengths.reshape(-1, k).sum(1))
    # Each sample scored as prompt + completion (its EOS included) with nothing before it: padding after a causal
    # model's last real token cannot change its value there. Under the "last" aggregation a solution's score is
    # its last step's, read at its last token.
    rows = [_prompt_ids(PROBLEMS[i // k]) + t[:n].tolist() for i, (t, n) in enumerate(zip(tokens, lengths))]
    right_padded = np.array([r + [PAD] * (max(map(len, rows)) - len(r)) for r in rows])
    values = jax.nn.sigmoid(value_model(jnp.asarray(right_padded)))
    scores = np.asarray(values)[np.arange(len(rows)), [len(r) - 1 for r in rows]].reshape(-1, k)
    assert np.all(np.ptp(scores, axis=1) > 1e-3)  # the verifier does separate the samples
    read = np.array([len(r) for r in rows]).reshape(-1, k).sum(1)  # the verifier reads each row once
    for name in ("best_of_n", "weighted_best_of_n"):
        np.testing.assert_array_equal(results[name].verifier_tokens, read)
    texts = np.array([TOKENIZER.decode(t[:n].tolist(), skip_special_tokens=True)
                      for t, n in zip(tokens, lengths)]).reshape(-1, k)
    for b in range(len(PROBLEMS)):
        answers = [TASK.extract_answer(t) for t in texts[b]]
        assert results["self_consistency"].completions[b] == texts[b][majority_vote(answers)]
        assert results["best_of_n"].completions[b] == texts[b][best_of(scores[b])]
        assert results["weighted_best_of_n"].completions[b] == texts[b][weighted_vote(answers, scores[b])]


def test_greedy_beam_search_follows_the_greedy_chain(policy, verifier):
    """At temperature 0 every proposal is the greedy next step, so the beams walk the greedy chain one step at
    a time, each step costs N * M copies of that step's tokens, and the verifier reads N * M times the prompt, the
    beam so far and the step."""
    config = dataclasses.replace(CONFIG, sampling=dataclasses.replace(CONFIG.sampling, temperature=0.0))
    result = beam_search(PROBLEMS, policy=policy, verifier=verifier, tokenizer=TOKENIZER, task=TASK,
                         budget=Budget(baseline=config), key=KEY)
    assert result.method == "beam_search"
    assert config.sampling.max_new_tokens >= config.max_steps * config.max_step_tokens  # the chain covers every step
    chain, chain_lengths = _samples(policy, config, KEY, 1, 0.0)
    newline = TOKENIZER.convert_tokens_to_ids("\n")
    rows = config.beam_width * config.proposals_per_beam
    for b in range(len(PROBLEMS)):
        ids = chain[b, : chain_lengths[b]].tolist()
        used, read = 0, 0
        for _ in range(config.max_steps):
            step = ids[used: used + config.max_step_tokens]
            ends = [i for i, t in enumerate(step) if t in (newline, EOS)]
            step = step[: ends[0] + 1] if ends else step
            used += len(step)
            read += rows * (len(_prompt_ids(PROBLEMS[b])) + used)
            if step[-1] == EOS or TASK.is_final_step(TOKENIZER.decode(step, skip_special_tokens=True)):
                break
        assert result.generated_tokens[b] == rows * used
        assert result.verifier_tokens[b] == read
        assert result.completions[b] == TOKENIZER.decode(ids[:used], skip_special_tokens=True)


def test_run_rejects_unknown_names_a_missing_verifier_and_no_problems(policy):
    with pytest.raises(ValueError, match="unknown test-time method 'tree_of_thought'"):
        solve("tree_of_thought", policy)
    for name in ("beam_search", "best_of_n", "weighted_best_of_n", "mcts"):
        with pytest.raises(ValueError, match="needs a verifier"):
            solve(name, policy)
    with pytest.raises(ValueError, match="no problems"):
        run("greedy", [], policy=policy, tokenizer=TOKENIZER, task=TASK, key=KEY)


@pytest.fixture
def recorded():
    """Registers test-time methods "recorded" (needs no verifier) and "recorded_scoring" (needs one), whose
    calls are recorded; removed again after the test."""
    calls = []

    def method(problems, *, policy, verifier, tokenizer, task, budget, key, chat=False, mesh=None):
        calls.append(dict(problems=problems, policy=policy, verifier=verifier, budget=budget, key=key, chat=chat,
                          mesh=mesh))
        b = len(problems)
        return MethodResult(method="recorded", completions=["The answer is 1"] * b, answers=["1"] * b,
                            correct=[True, False][:b] + [False] * (b - 2), generated_tokens=np.full(b, 3, np.int64),
                            verifier_tokens=np.full(b, 5 if verifier is not None else 0, np.int64), seconds=0.25)

    register_method("recorded", method, needs_verifier=False)
    register_method("recorded_scoring", method, needs_verifier=True)
    yield calls
    for name in ("recorded", "recorded_scoring"):
        methods._METHODS.pop(name)


def test_registry_run_and_compare(recorded, policy, verifier):
    """The built-in methods are registered in order with what they need; `run` hands a method the verifier only
    when it needs one, and `compare` runs each method with `fold_in(key, i)` and reports its totals."""
    assert method_names()[:len(BASELINES) + 2] == [*BASELINES, "mcts", "rstar"]
    assert [needs_verifier(m) for m in (*BASELINES, "mcts", "rstar")] == [False, False, True, True, True, True, False]
    assert method_names()[-2:] == ["recorded", "recorded_scoring"]
    with pytest.raises(ValueError, match="already registered"):
        register_method("greedy", lambda *a, **k: None, needs_verifier=False)
    rows = compare(["recorded", "recorded_scoring"], PROBLEMS, key=KEY, policy=policy, verifier=verifier,
                   tokenizer=TOKENIZER, task=TASK, budget=BUDGET, chat=True)
    assert [c["verifier"] for c in recorded] == [None, verifier]
    assert all(c["policy"] is policy and c["budget"] is BUDGET and c["chat"] and c["mesh"] is None for c in recorded)
    for i, c in enumerate(recorded):
        np.testing.assert_array_equal(jax.random.key_data(c["key"]), jax.random.key_data(jax.random.fold_in(KEY, i)))
    assert rows == [
        {"method": "recorded", "accuracy": 1 / 3, "generated_tokens": 9, "verifier_tokens": 0, "seconds": 0.25,
         "problems": 3},
        {"method": "recorded_scoring", "accuracy": 1 / 3, "generated_tokens": 9, "verifier_tokens": 15,
         "seconds": 0.25, "problems": 3},
    ]


def test_config_validation():
    with pytest.raises(ValueError, match="beam_width"):
        BaselineConfig(beam_width=0)
    with pytest.raises(ValueError, match="max_step_tokens"):
        BaselineConfig(max_step_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        BaselineConfig(sampling=SamplingConfig(top_p=0.0))


# ---------------------------------------------------------------- a policy that knows the answers


@pytest.fixture(scope="module")
def memorised_policy():
    """The tiny model trained on the gold solutions of PROBLEMS until it reproduces them."""
    return memorise(CausalLM(MODEL, rngs=nnx.Rngs(3)), TOKENIZER, TASK, PROBLEMS, steps=150, max_len=80)


def test_memorised_policy_solves_its_problems_with_every_method(memorised_policy, verifier):
    gold_tokens = np.array([len(TASK.format_solution(p.solution_steps, p.answer)) + 1 for p in PROBLEMS])  # + EOS
    per_problem = {"greedy": 1, "self_consistency": CONFIG.num_samples, "best_of_n": CONFIG.num_samples,
                   "weighted_best_of_n": CONFIG.num_samples,
                   "beam_search": CONFIG.beam_width * CONFIG.proposals_per_beam}
    for name in BASELINES:
        result = solve(name, memorised_policy, verifier)
        assert result.correct == [True] * len(PROBLEMS), (name, result.completions)
        assert result.answers == [p.answer for p in PROBLEMS]
        np.testing.assert_array_equal(result.generated_tokens, per_problem[name] * gold_tokens)
