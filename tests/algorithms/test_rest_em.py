"""ReST-EM sampling spends the token budget it is given: whole first round, then only what the budget needs."""

import jax
import tiny
from tiny import TOKENIZER

from jaxreason.algorithms.rest_em import sample_solutions
from jaxreason.sampling import SamplingConfig
from jaxreason.tasks import get_task


def _sample(budget: int):
    policy = tiny.policy(0)  # random: solutions of varied length, few correct
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
