"""MCTS driven by a real (tiny, random) policy and PRM: multi-action expansion, terminals, token budgets,
determinism, and trees unchanged by batching, a device mesh, a shrinking decode and packed prefills. Every search
here runs under `MCTSConfig`'s defaults (ReST-MCTS*'s reference rule) unless a test says otherwise."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import CONFIG, TOKENIZER

from jaxreason.models import CausalLM, ValueModel
from jaxreason.sampling import SamplingConfig
from jaxreason.search.actions import ROOT, ActionSpace, ActionType
from jaxreason.search.config import MCTSConfig
from jaxreason.search.mcts import search_trees
from jaxreason.search.node import NO_SLOT
from jaxreason.search.selection import INVALID_LOGIT
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier

TASK = get_task("arith")
PROBLEMS = TASK.problems("test", n=3, seed=0)
SEARCH = MCTSConfig(rule="rest_mcts", num_simulations=8, num_candidates=3, max_depth=3,
                    sampling=SamplingConfig(max_new_tokens=16, temperature=1.0))
# The roll-forward off, in batches of 2 problems (one compiled program for the two tests that use it).
NO_ROLL = dataclasses.replace(SEARCH, rollout_steps=0, batch_size=2)
# Two action types with an ordering constraint: the root may only take a step; after a step, either another
# step or the final answer (whose template starts the answer line); nothing follows an answer.
TWO_TYPES = ActionSpace(
    types=(ActionType("step", num_samples=2), ActionType("answer", num_samples=1, template="The answer is ",
                                                         until_step_end=False)),
    allowed_after=((ROOT, ("step",)), ("step", ("step", "answer"))),
)


@pytest.fixture(scope="module")
def models():
    """The policy and a verifier on a value model of its own (random head, so values differ)."""
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    prm = ValueModel(CONFIG, rngs=nnx.Rngs(1))
    prm.head[...] = jax.random.normal(jax.random.key(2), prm.head[...].shape)
    return policy, ValueVerifier(prm)


def mcts(policy, verifier, problems, config, key, **kwargs):
    return search_trees(problems, policy=policy, verifier=verifier, tokenizer=TOKENIZER, task=TASK, config=config,
                        key=key, **kwargs)


def _visited_nodes(traces):
    return [p for t in traces for p in t.paths]


def test_single_step_search_runs_and_counts_tokens(models):
    policy, verifier = models
    result, traces = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(0))
    assert len(result.completions) == len(PROBLEMS) and len(traces) == len(PROBLEMS)
    assert np.all(result.generated_tokens > 0)
    for t in traces:
        assert len(t.paths) >= 2  # the root and at least one expansion
        for path in t.paths:
            assert np.all(np.diff(path.step_ends) > 0)
            assert not np.any(path.terminal[:-1])  # no node below a terminal one is reported
            assert path.depth <= SEARCH.max_depth
    again, _ = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(0))
    assert again.completions == result.completions
    np.testing.assert_array_equal(again.verifier_tokens, result.verifier_tokens)


def test_token_budget_counts_each_sampled_candidate_once(models):
    """With the roll-forward off, every non-terminal reported node sampled K candidates of at most
    max_step_tokens each, and nothing else was sampled; the verifier (a model of its own) read each such node's
    partial solution once and its K candidates on top of it, and nothing else."""
    policy, verifier = models
    config = NO_ROLL
    _, traces = mcts(policy, verifier, PROBLEMS, config, jax.random.key(1))
    result, _ = mcts(policy, verifier, PROBLEMS, config, jax.random.key(1))
    assert result.verifier_tokens.shape == (len(PROBLEMS),) and result.verifier_tokens.dtype == np.int64
    assert result.total_verifier_tokens == int(result.verifier_tokens.sum())
    for t, tokens, read in zip(traces, result.generated_tokens, result.verifier_tokens):
        open_nodes = [p for p in t.paths if not p.terminal[-1]]
        assert 0 < tokens <= len(open_nodes) * config.num_candidates * config.max_step_tokens
        assert read == sum(len(p.tokens) for p in open_nodes) + tokens


def test_token_budget_counts_the_roll_forward(models):
    """With the roll-forward on (the default), a node's creation also samples up to rollout_steps rounds of K
    candidates from its best child, and the verifier reads each round's partial solution and candidates: the
    tokens stay within (1 + r) times the nodes' own bound, and the verifier read more than the nodes alone."""
    policy, verifier = models
    assert SEARCH.rollout_steps > 0
    result, traces = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(1))
    beyond = []
    for t, tokens, read in zip(traces, result.generated_tokens, result.verifier_tokens):
        open_nodes = [p for p in t.paths if not p.terminal[-1]]
        most = len(open_nodes) * SEARCH.num_candidates * SEARCH.max_step_tokens
        assert 0 < tokens <= (1 + SEARCH.rollout_steps) * most
        # Every token sampled is read once as a candidate; on top, each node's and each roll step's prefix.
        beyond.append(read - tokens - sum(len(p.tokens) for p in open_nodes))
    assert min(beyond) >= 0 and max(beyond) > 0


def test_two_action_types_respect_the_ordering_constraint(models):
    policy, verifier = models
    config = MCTSConfig(rule="rest_mcts", num_simulations=10, num_candidates=3, max_depth=3,
                        sampling=SamplingConfig(max_new_tokens=24, temperature=1.0))
    result, traces = mcts(policy, verifier, PROBLEMS, config, jax.random.key(3), action_space=TWO_TYPES)
    answer_slot = 2  # slots: step, step, answer
    template = TOKENIZER.encode("The answer is ", add_special_tokens=False)
    saw_answer = False
    for t in traces:
        for path in t.paths:
            if path.depth:
                assert path.actions[0] != answer_slot  # never an answer straight from the root
            for i, action in enumerate(path.actions):
                if action == answer_slot:
                    saw_answer = True
                    start = path.step_ends[i - 1]
                    assert path.tokens[start : start + len(template)].tolist() == template
                    assert path.terminal[i + 1]  # the answer line ends the solution
    assert saw_answer


def test_priors_mark_invalid_slots(models):
    """At the root the answer slot is invalid; so is every slot of a terminal node."""
    from jaxreason.search.expansion import ExpansionSpec, StepSearch, build_step_tables

    policy, verifier = models
    spec = ExpansionSpec(max_len=96, sampling=SamplingConfig(max_new_tokens=24), max_depth=2, pad_id=0,
                         eos_ids=(TOKENIZER.eos_token_id,))
    tables = build_step_tables(TOKENIZER, TWO_TYPES, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    verifier_def, verifier_state = nnx.split(verifier)
    with pytest.raises(ValueError, match="template"):
        StepSearch(policy_def, verifier_def, TWO_TYPES,
                   ExpansionSpec(max_len=96, sampling=SamplingConfig(max_new_tokens=12), max_depth=2), tables)
    search = StepSearch(policy_def, verifier_def, TWO_TYPES, spec, tables)
    ids = TOKENIZER.encode("Q: 1 + 2?\n", add_special_tokens=False)
    tokens = np.zeros((1, 96), np.int32)
    tokens[0, : len(ids)] = ids
    params = (policy_state, verifier_state)
    prompts = search.encode_prompts(params, tokens, np.asarray([len(ids)], np.int32))
    root = search.root_fn(params, jax.random.key(0), prompts)
    priors = np.asarray(root.prior_logits[0])
    assert priors[2] == INVALID_LOGIT and np.all(priors[:2] > INVALID_LOGIT / 2)
    out, child = search.recurrent_fn(params, jax.random.key(1), np.asarray([0]), root.embedding, prompts)
    assert int(child.depth[0]) == 1
    out2, grandchild = search.recurrent_fn(params, jax.random.key(2), np.asarray([0]), child, prompts)
    assert bool(grandchild.terminal[0])  # max_depth 2 reached
    assert float(out2.discount[0]) == 0 and float(out2.reward[0]) == float(grandchild.terminal_value[0])
    assert np.all(np.asarray(out2.prior_logits) == INVALID_LOGIT)
    assert int(grandchild.generated_tokens[0]) == int(grandchild.verifier_tokens[0]) == 0  # a terminal node
    assert int(grandchild.rolled_slot[0]) == NO_SLOT  # has no best child to visit
    # Below a terminal node: the same node, the same score, nothing sampled.
    out3, below = search.recurrent_fn(params, jax.random.key(3), np.asarray([0]), grandchild, prompts)
    np.testing.assert_array_equal(np.asarray(below.tokens), np.asarray(grandchild.tokens))
    assert float(out3.reward[0]) == float(grandchild.terminal_value[0]) and float(out3.discount[0]) == 0
    assert int(below.generated_tokens[0]) == int(below.verifier_tokens[0]) == 0


def test_problems_go_through_in_batches(models):
    """batch_size 2 over 3 problems: two calls of one shape (the second padded), one result per problem."""
    policy, verifier = models
    assert NO_ROLL.batch_size == 2
    result, traces = mcts(policy, verifier, PROBLEMS, NO_ROLL, jax.random.key(4))
    assert len(result.completions) == len(traces) == len(result.generated_tokens) == 3
    for problem, t in zip(PROBLEMS, traces):
        root = t.paths[0]
        assert TOKENIZER.decode(root.tokens[: root.prompt_len].tolist()) == TASK.prompt(problem)
    assert np.all(result.generated_tokens > 0)


def test_search_split_over_devices_gives_the_same_trees(models):
    """Over an 8-device mesh (3 problems padded to 8, one per device) every tree equals the one-device search's."""
    policy, verifier = models
    mesh = make_mesh(MeshConfig(data=-1))
    assert mesh.size == 8
    one, one_traces = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(5))
    split, split_traces = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(5), mesh=mesh)
    _assert_same_searches((one, one_traces), (split, split_traces))


def _assert_same_searches(first, second):
    """Same answers, token counts, and trees (path texts, visit counts and values)."""
    (result_a, traces_a), (result_b, traces_b) = first, second
    assert result_b.completions == result_a.completions
    np.testing.assert_array_equal(result_b.generated_tokens, result_a.generated_tokens)
    np.testing.assert_array_equal(result_b.verifier_tokens, result_a.verifier_tokens)
    for a, b in zip(traces_a, traces_b):
        assert [p.text for p in a.paths] == [p.text for p in b.paths]
        for p, q in zip(a.paths, b.paths):
            np.testing.assert_array_equal(p.visits, q.visits)
            np.testing.assert_allclose(p.values, q.values, atol=1e-5)


def test_muzero_search_split_over_devices_samples_each_row_on_its_own(models):
    """MuZero over the mesh: the split search runs, and copies of one problem on different devices get different
    trees (their rows draw by their index in the whole batch, not by their index on their device)."""
    policy, verifier = models
    config = dataclasses.replace(SEARCH, rule="muzero")
    same_problem = [PROBLEMS[0]] * 8  # one per device
    result, traces = mcts(policy, verifier, same_problem, config, jax.random.key(6),
                          mesh=make_mesh(MeshConfig(data=-1)))
    assert len(result.completions) == 8 and np.all(result.generated_tokens > 0)
    assert len({tuple(p.text for p in t.paths) for t in traces}) > 1


def test_shrinking_candidate_decode_gives_the_same_trees(models):
    """`sampling.shrink_at` only changes how many rows each decode step computes, not what is sampled."""
    policy, verifier = models
    shrinking = dataclasses.replace(SEARCH.sampling, shrink_at=(0.75, 0.5, 0.25))
    assert SEARCH.sampling.shrink_at == ()
    whole = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(7))
    phased = mcts(policy, verifier, PROBLEMS, dataclasses.replace(SEARCH, sampling=shrinking), jax.random.key(7))
    _assert_same_searches(whole, phased)


def test_packed_node_prefill_gives_the_same_trees(models):
    """`prefill_packing` only changes which tokens the prefill's matmuls compute (the real ones), not the
    search: the same trees as the padded prefill, with one depth of steps per row and several."""
    policy, verifier = models
    padded = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(8))
    packed = mcts(policy, verifier, PROBLEMS, dataclasses.replace(SEARCH, prefill_packing=(0.25, 0.5)),
                  jax.random.key(8))
    _assert_same_searches(padded, packed)
    assert max(len(p.visits) for t in packed[1] for p in t.paths) > 2  # some prefills held two steps or more


@pytest.mark.parametrize("field, value", [("expansion_sizes", (0.5,)), ("expansion_sizes", (1.0, 1.5)),
                                          ("prefill_packing", (0.5, 1.0)), ("num_simulations", 0),
                                          ("rule", "alphazero"), ("unvisited", "first"), ("backup", "max"),
                                          ("rollout_steps", -1), ("rollout_alpha", 1.5)])
def test_bad_search_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"mcts.{field}"):
        MCTSConfig(**{field: value})


def test_bad_shrink_fractions_name_the_field():
    with pytest.raises(ValueError, match="shrink_at"):
        SamplingConfig(shrink_at=(0.5, 1.0))
