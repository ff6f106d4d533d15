"""GenRM's training rows and objective, the CoT verifier's average over rationales, and the Bradley-Terry reward
model's pairs, each against a computation by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.algorithms.preference_pairs import Pair, pair_batch
from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.sampling.generate import SamplingConfig, sample
from jaxreason.train.objectives import bradley_terry_objective, generative_verifier_objective
from jaxreason.verifiers import StepSplitter, make_verifier, score_solutions
from jaxreason.verifiers.generative import CoTGenerativeVerifier, GenerativeVerifier
from jaxreason.verifiers.generative_data import (
    VerdictFormat,
    solution_examples,
    verdict_ids,
    verification_batch,
    verification_examples,
)
from tests.tiny import EOS, PAD, TOKENIZER, policy, value_model

FORMAT = VerdictFormat(question="\nOK? ", yes_text="Yes", no_text="No", intro="\nSo:\n")
IDS = verdict_ids(TOKENIZER, FORMAT)
PROMPT = TOKENIZER.encode("Q: 1 + 2\n")


def _trace(text: str, correct: bool) -> Trace:
    tokens = np.asarray(PROMPT + TOKENIZER.encode(text) + [EOS], np.int32)
    return Trace(problem_id=0, iteration=0, tokens=tokens, prompt_len=len(PROMPT), step_ends=np.zeros(0, np.int32),
                 step_values=np.zeros(0, np.float32), reward=float(correct), flags=FLAG_CORRECT if correct else 0)


def _p_yes(model, ids, token: int = IDS.yes) -> float:
    """P(token) (default: Yes) after the sequence `ids`."""
    ids = jnp.asarray([list(ids)])
    return float(jax.nn.softmax(model(ids, jnp.ones_like(ids))[0, -1].astype(jnp.float32))[token])


def test_verdict_ids_are_the_first_tokens_and_clashes_are_named():
    assert IDS.yes == TOKENIZER.convert_tokens_to_ids("Y") and IDS.no == TOKENIZER.convert_tokens_to_ids("N")
    assert IDS.question == tuple(TOKENIZER.encode("\nOK? "))
    with pytest.raises(ValueError, match="start with the same token"):
        verdict_ids(TOKENIZER, dataclasses.replace(FORMAT, yes_text=" Yes", no_text=" No"))


def test_rows_put_the_verdict_after_the_question_and_mask_the_rationale():
    right, wrong = _trace("1 + 2 = 3\nThe answer is 3", True), _trace("The answer is 4", False)
    rationale = TOKENIZER.encode("The answer is 3")
    direct = verification_examples([right, wrong], IDS)
    cot = verification_examples([right], IDS, rationales=[rationale], eos_id=EOS)
    assert list(direct[0].tokens) == list(right.tokens) + list(IDS.question) + [IDS.yes]
    assert list(direct[1].tokens) == list(wrong.tokens) + list(IDS.question) + [IDS.no]
    assert direct[1].verdict_position == len(direct[1].tokens) - 1
    expected = list(right.tokens) + list(IDS.intro) + rationale + [EOS] + list(IDS.question) + [IDS.yes]
    assert list(cot[0].tokens) == expected
    batch = verification_batch(cot + solution_examples([right, wrong]), max_len=80, pad_id=PAD)
    start = len(right.tokens) + len(IDS.intro)
    assert np.flatnonzero(batch["rationale_mask"][0]).tolist() == list(range(start, start + len(rationale) + 1))
    assert batch["solution_mask"][0].sum() == 0 and batch["rationale_mask"][1].sum() == 0
    assert np.flatnonzero(batch["solution_mask"][1]).tolist() == list(range(len(PROMPT), len(right.tokens)))
    assert batch["verdict_position"].tolist() == [len(expected) - 1, 0] and len(batch["label"]) == 2
    with pytest.raises(ValueError, match="max_len = 20"):
        verification_batch(cot, max_len=20, pad_id=PAD)


def test_objective_by_hand():
    model = policy(0)
    right, wrong = _trace("1 + 2 = 3\nThe answer is 3", True), _trace("The answer is 4", False)
    rows = verification_examples([right, wrong], IDS) + solution_examples([right])
    batch = {k: jnp.asarray(v) for k, v in verification_batch(rows, max_len=64, pad_id=PAD).items()}
    loss, metrics = generative_verifier_objective(IDS.yes, IDS.no, 0.5)(model, batch, jax.random.key(0))
    verdict = -np.mean([np.log(_p_yes(model, right.tokens.tolist() + list(IDS.question))),
                        np.log(_p_yes(model, wrong.tokens.tolist() + list(IDS.question), IDS.no))])
    logits = model(jnp.asarray([right.tokens]), jnp.ones((1, len(right.tokens)), jnp.int32))[0]
    logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32))
    targets = right.tokens[1:]
    solution = -np.mean([float(logp[t, targets[t]]) for t in range(len(PROMPT) - 1, len(right.tokens) - 1)])
    np.testing.assert_allclose(float(metrics["verdict_loss"]), verdict, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["solution_loss"]), solution, rtol=1e-4)
    np.testing.assert_allclose(float(loss), verdict + 0.5 * solution, rtol=1e-4)
    assert float(metrics["rationale_loss"]) == 0.0


def test_cot_score_is_the_mean_p_yes_over_its_own_rationales():
    model, seed, r = policy(1), 3, 3
    config = SamplingConfig(max_new_tokens=6, temperature=1.0)
    verifier = CoTGenerativeVerifier(model, IDS.question, IDS.yes, IDS.no, intro_ids=IDS.intro, num_rationales=r,
                                     sampling=config, eos_ids=(EOS,), pad_id=PAD, seed=seed)
    text = PROMPT + TOKENIZER.encode("1 + 2 = 3\nThe answer is 3")
    tokens = np.asarray([text + [PAD] * 2])
    positions = [len(PROMPT) + 4, len(text) - 1]
    got = np.asarray(verifier.values_at(jnp.asarray(tokens), jnp.asarray((tokens != PAD).astype(np.int32)),
                                        jnp.asarray([positions])))[0]
    width = tokens.shape[1]
    for s, pos in enumerate(positions):
        prefix = text[:pos + 1]
        prompt = np.asarray([[PAD] * (width - len(prefix)) + prefix + list(IDS.intro)])
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(s * r, (s + 1) * r))
        out = sample(model, jnp.asarray(prompt), jnp.asarray((np.arange(prompt.shape[1]) >= width - len(prefix))
                                                              .astype(np.int32)[None]), keys, config, eos_ids=(EOS,),
                     pad_id=PAD, samples_per_prompt=r)
        rationales = [np.asarray(out.tokens[k, :int(out.lengths[k])]).tolist() for k in range(r)]
        expected = np.mean([_p_yes(model, prefix + list(IDS.intro) + z + list(IDS.question)) for z in rationales])
        np.testing.assert_allclose(got[s], expected, rtol=1e-4, atol=1e-5)
    assert isinstance(make_verifier("generative_cot", model, question_ids=IDS.question, yes_id=IDS.yes,
                                    no_id=IDS.no, intro_ids=IDS.intro, num_rationales=1, sampling=config,
                                    eos_ids=(EOS,), pad_id=PAD), GenerativeVerifier)


def test_bradley_terry_objective_reads_the_last_tokens():
    model = value_model(2)
    better, worse = _trace("1 + 2 = 3\nThe answer is 3", True), _trace("The answer is 4", False)
    batch = {k: jnp.asarray(v) for k, v in pair_batch([Pair(better, worse)], 48, PAD).items()}
    loss, metrics = bradley_terry_objective(model, batch, jax.random.key(0))

    def last_logit(t):
        return float(model(jnp.asarray([t.tokens]), jnp.ones((1, len(t.tokens)), jnp.int32))[0, -1])

    margin = last_logit(better) - last_logit(worse)
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-margin)), rtol=1e-4)
    assert float(metrics["accuracy"]) == float(margin > 0)


def test_cot_scores_a_whole_solution_by_its_final_verdict():
    config = SamplingConfig(max_new_tokens=6, temperature=1.0)
    verifier = CoTGenerativeVerifier(policy(1), IDS.question, IDS.yes, IDS.no, intro_ids=IDS.intro, num_rationales=2,
                                     sampling=config, eos_ids=(EOS,), pad_id=PAD, seed=5)
    solution = TOKENIZER.encode("1 + 2 = 3\nThe answer is 3") + [EOS]
    scored = score_solutions(verifier, [PROMPT], [solution], StepSplitter(TOKENIZER, "\n"), pad_id=PAD)
    row = np.asarray([PROMPT + solution + [PAD] * (64 - len(PROMPT) - len(solution))])  # the scorer's width
    final = verifier.values_at(jnp.asarray(row), jnp.asarray((row != PAD).astype(np.int32)),
                               jnp.asarray([[len(PROMPT) + len(solution) - 1]]))
    np.testing.assert_allclose(scored.scores, np.asarray(final)[:, 0], rtol=1e-5)
    np.testing.assert_allclose(scored.step_scores[0], [scored.scores[0]] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation must be 'last'"):
        CoTGenerativeVerifier(policy(1), IDS.question, IDS.yes, IDS.no, intro_ids=IDS.intro, num_rationales=1,
                              sampling=config, eos_ids=(EOS,), pad_id=PAD, aggregation="min")
