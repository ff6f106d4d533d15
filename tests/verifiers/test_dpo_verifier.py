"""The DPO verifier through the verifier interface: its score is beta (log pi_V - log pi_ref), read at the one
score position, the same under any padding, and ranks the solutions of a prompt by the paper's score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx

from jaxreason.models import CausalLM
from jaxreason.models.lora import add_lora
from jaxreason.sampling import SamplingConfig
from jaxreason.search.config import BaselineConfig, Budget, MCTSConfig
from jaxreason.search.methods import run
from jaxreason.tasks import get_task
from jaxreason.train.losses import dpo_score, sequence_logprob
from jaxreason.verifiers import StepSplitter, make_verifier, score_solutions
from jaxreason.verifiers.dpo import DPOVerifier

BETA = 0.5


@pytest.fixture(scope="module")
def verifier():
    return DPOVerifier(tiny.policy(1), tiny.policy(2), BETA)


def _solution_logprob(model, prompt, solution):
    """log pi(solution | prompt), from the model's logits of the whole row."""
    tokens = jnp.asarray([prompt + solution])
    mask = jnp.zeros_like(tokens).at[0, len(prompt):].set(1)
    return float(sequence_logprob(model(tokens, jnp.ones_like(tokens)), tokens, mask)[0])


def test_the_score_ranks_the_solutions_of_a_prompt_by_the_implicit_dpo_reward(verifier):
    enc = lambda s: tiny.TOKENIZER.encode(s, add_special_tokens=False)
    prompt = enc("Q: 3+4=?\n")
    solutions = [enc("3+4=7\nThe answer is 7") + [tiny.EOS], enc("3+4=8\nThe answer is 8") + [tiny.EOS],
                 enc("7")]
    scored = score_solutions(verifier, [prompt] * 3, solutions, StepSplitter(tiny.TOKENIZER, "\n"), pad_id=tiny.PAD)
    logit = np.log(scored.scores / (1 - scored.scores))
    paper = np.asarray([float(dpo_score(jnp.asarray(_solution_logprob(verifier.model, prompt, s)),
                                        jnp.asarray(_solution_logprob(verifier.reference, prompt, s)), BETA))
                        for s in solutions])
    # the same score up to the prompt's own term, which every solution of the prompt shares
    np.testing.assert_allclose(logit - logit[0], paper - paper[0], atol=2e-4)
    assert np.all((scored.scores > 0) & (scored.scores < 1))


def test_left_and_right_padding_give_the_same_values(verifier):
    row = tiny.TOKENIZER.encode("Q: 1+2=?\n1+2=3\n", add_special_tokens=False)
    right = jnp.asarray([row + [tiny.PAD] * 5])
    left = jnp.asarray([[tiny.PAD] * 5 + row])
    ones = jnp.ones(len(row), jnp.int32)
    right_mask = jnp.concatenate([ones, jnp.zeros(5, jnp.int32)])[None]
    left_mask = jnp.concatenate([jnp.zeros(5, jnp.int32), ones])[None]
    at = jnp.asarray([[3, 9, len(row) - 1]])
    np.testing.assert_allclose(verifier.values_at(left, left_mask, at + 5), verifier.values_at(right, right_mask, at),
                               atol=2e-5)


def test_the_reference_itself_scores_one_half_everywhere():
    model = tiny.policy(3)
    same = DPOVerifier(model, nnx.merge(*nnx.split(model)), BETA)
    tokens = jnp.asarray([tiny.TOKENIZER.encode("Q: 5+5=?\n5+5=10\n", add_special_tokens=False)])
    values = same.values_at(tokens, jnp.ones_like(tokens), jnp.arange(tokens.shape[1])[None])
    np.testing.assert_allclose(values, 0.5, atol=1e-6)


def test_registered_and_checked():
    model, reference = tiny.policy(1), tiny.policy(2)
    assert isinstance(make_verifier("dpo", model, reference=reference, beta=0.2), DPOVerifier)
    other = CausalLM(tiny.NUMERIC, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocabulary"):
        DPOVerifier(model, other, BETA)
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOVerifier(model, reference, 0.0)


def test_with_lora_the_reference_is_the_model_with_its_adapters_off():
    model = tiny.policy(4)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        DPOVerifier(model, None, BETA)
    add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    verifier = DPOVerifier(model, None, BETA)
    tokens = jnp.asarray([tiny.TOKENIZER.encode("Q: 2+2=?\n2+2=4\n", add_special_tokens=False)])
    at = jnp.arange(tokens.shape[1])[None]
    np.testing.assert_allclose(verifier.values_at(tokens, jnp.ones_like(tokens), at), 0.5, atol=1e-6)  # B = 0
    layers = model.transformer.layers
    layers.attention.q_lora_b[...] = jnp.ones_like(layers.attention.q_lora_b[...]) * 0.1  # the adapters move pi_V
    base = tiny.policy(4)
    np.testing.assert_allclose(verifier.values_at(tokens, jnp.ones_like(tokens), at),
                               DPOVerifier(model, base, BETA).values_at(tokens, jnp.ones_like(tokens), at), atol=1e-5)


def test_every_scoring_method_takes_it(verifier):
    task = get_task("arith", max_ops=1)
    budget = Budget(baseline=BaselineConfig(num_samples=2, sampling=SamplingConfig(max_new_tokens=16), beam_width=2,
                                            proposals_per_beam=2, max_steps=2, max_step_tokens=8),
                    mcts=MCTSConfig(num_simulations=2, num_candidates=2, max_depth=2,
                                    sampling=SamplingConfig(max_new_tokens=8)))
    problems = task.problems("test", n=2)
    for method in ("best_of_n", "weighted_best_of_n", "beam_search", "mcts"):
        result = run(method, problems, policy=verifier.reference, verifier=verifier, tokenizer=tiny.TOKENIZER,
                     task=task, budget=budget, key=jax.random.key(0))
        assert len(result.correct) == 2 and result.total_verifier_tokens > 0, method
