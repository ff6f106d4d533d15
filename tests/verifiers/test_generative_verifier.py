"""The generative verifier: P(Yes) after the verification question, read at any position of any padding layout,
as a hand-built sequence through the same model gives it; and through the batch scorer best-of-N uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.verifiers import make_verifier, score_solutions
from jaxreason.verifiers.generative import GenerativeVerifier
from jaxreason.verifiers.positions import StepSplitter
from tests.tiny import PAD, TOKENIZER, policy

QUESTION = TOKENIZER.encode("\nCorrect? ")
YES, NO = TOKENIZER.convert_tokens_to_ids("Y"), TOKENIZER.convert_tokens_to_ids("N")
TEXT = TOKENIZER.encode("Q: 1 + 2\n1 + 2 = 3\nThe answer is 3")


def _by_hand(model, prefix):
    ids = jnp.asarray([list(prefix) + QUESTION])
    logits = model(ids, jnp.ones_like(ids))
    return float(jax.nn.softmax(logits[0, -1].astype(jnp.float32))[YES])


def test_values_are_p_yes_after_the_question_at_each_position():
    model = policy(0)
    verifier = GenerativeVerifier(model, QUESTION, YES, NO)
    right = np.asarray([TEXT + [PAD] * 3])
    left = np.asarray([[PAD] * 3 + TEXT])
    positions = [9, 18, len(TEXT) - 1]
    got_right = verifier.values_at(jnp.asarray(right), jnp.asarray((right != PAD).astype(np.int32)),
                                   jnp.asarray([positions]))
    got_left = verifier.values_at(jnp.asarray(left), jnp.asarray((left != PAD).astype(np.int32)),
                                  jnp.asarray([[p + 3 for p in positions]]))
    expected = [_by_hand(model, TEXT[:p + 1]) for p in positions]
    np.testing.assert_allclose(np.asarray(got_right)[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_left)[0], expected, rtol=1e-4, atol=1e-5)


def test_best_of_n_scoring_reads_the_final_verdict():
    model = policy(0)
    verifier = make_verifier("generative", model, question_ids=QUESTION, yes_id=YES, no_id=NO)
    prompt = TOKENIZER.encode("Q: 1 + 2\n")
    solutions = [np.asarray(TOKENIZER.encode(s)) for s in ("1 + 2 = 3\nThe answer is 3", "The answer is 4")]
    scored = score_solutions(verifier, [prompt, prompt], solutions, StepSplitter(TOKENIZER, "\n"), pad_id=PAD)
    expected = [_by_hand(model, prompt + list(s)) for s in solutions]
    np.testing.assert_allclose(scored.scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"question_ids": []}, "needs a verification question"),
    ({"yes_id": 5, "no_id": 5}, "two different ids"),
    ({"aggregation": "mean"}, "unknown aggregation"),
])
def test_bad_settings_are_named(kwargs, message):
    settings = {"question_ids": QUESTION, "yes_id": YES, "no_id": NO} | kwargs
    with pytest.raises(ValueError, match=message):
        GenerativeVerifier(policy(0), **settings)
