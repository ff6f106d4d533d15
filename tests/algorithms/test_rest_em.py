"""ReST-EM sampling spends the token budget it is given: whole first round, then only what the budget needs."""

import jax
from flax import nnx

from jaxreason.algorithms.rest_em import sample_solutions
from jaxreason.models import CausalLM, ModelConfig
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sampling import SamplingConfig
from jaxreason.tasks import get_task

TOKENIZER = build_char_tokenizer()


def _sample(budget: int):
    config = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, eos_token_id=TOKENIZER.eos_token_id,
                         pad_token_id=TOKENIZER.pad_token_id)
    policy = CausalLM(config, rngs=nnx.Rngs(0))  # random: solutions of varied length, few correct
    task = get_task("arith")
    problems = task.problems("train", n=64, seed=0)
    return sample_solutions(policy, TOKENIZER, task, problems, list(range(64)), token_budget=budget,
                            samples_per_round=2, sampling=SamplingConfig(max_new_tokens=16, temperature=1.0),
                            key=jax.random.key(0), iteration=1)


def test_a_later_round_draws_only_what_the_budget_needs():
    first, first_tokens = _sample(budget=1)  # one round: 64 problems x 2 samples
    assert len(first) == 128 and sum(len(t.tokens) - t.prompt_len for t in first) == first_tokens
    budget = first_tokens + first_tokens // 4  # about 32 more samples, cut to 64 (whole row multiples)
    traces, generated = _sample(budget)
    assert len(traces) == 128 + 64
    assert generated >= budget and generated - budget < 64 * 16
    assert [t.tokens.tolist() for t in traces[:128]] == [t.tokens.tolist() for t in first]  # the same first round
    extra = [t.problem_id for t in traces[128:]]
    assert len(set(extra)) == 64 and max(extra) - min(extra) == 63  # one more sample for each problem
