"""rStar's generator on a real (tiny, random) policy: the paper's action table, each action's node bookkeeping in
real trees, the in-program answers and majority, trees unchanged by batching, and the errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import CONFIG, TOKENIZER

from jaxreason.models import CausalLM, ValueModel
from jaxreason.sampling import prompt_ids
from jaxreason.search.actions import ROOT
from jaxreason.search.rstar import AnswerKeys, finished_trajectories, majority, rstar_trees
from jaxreason.search.rstar_config import (
    ACTIONS,
    FINISH,
    REANSWER,
    REPHRASE,
    STEP,
    SUBQUESTION,
    RStarConfig,
    RStarPrompts,
)
from jaxreason.search.selection import INVALID_LOGIT
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier

TASK = get_task("arith")
PROBLEMS = TASK.problems("test", n=3, seed=0)
KEY = jax.random.key(0)
SMALL = RStarConfig(num_rollouts=6, num_steps=2, num_votes=2, max_depth=3, step_tokens=8, answer_tokens=8,
                    solution_tokens=12, batch_size=3)
# One path through every bookkeeping case: A5 at the root, then A3, A4 (re-answering A3's sub-question), A2.
CHAIN = dataclasses.replace(SMALL, num_rollouts=4, max_depth=5, allowed_after={
    ROOT: (REPHRASE,), REPHRASE: (SUBQUESTION,), SUBQUESTION: (REANSWER,), REANSWER: (FINISH,)})


@pytest.fixture(scope="module")
def policy():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


def trees(policy, config, problems=PROBLEMS):
    return list(rstar_trees(problems, policy=policy, tokenizer=TOKENIZER, task=TASK, config=config, key=KEY))


@pytest.fixture(scope="module")
def batched(policy):
    [(tree, real)] = trees(policy, SMALL)
    assert real == len(PROBLEMS)
    return tree


def _allowed(config: RStarConfig) -> dict[str, set[str]]:
    space = config.action_space()
    types, validity = space.slot_types(), space.validity()
    return {name: {ACTIONS[t] for t in types[validity[i]]}
            for name, i in [(a, j) for j, a in enumerate(ACTIONS)] + [(ROOT, space.root_type)]}


def test_the_paper_validity_table():
    assert _allowed(RStarConfig()) == {
        ROOT: {STEP, FINISH, SUBQUESTION, REPHRASE},
        REPHRASE: {STEP, FINISH, SUBQUESTION},
        SUBQUESTION: {STEP, FINISH, SUBQUESTION, REANSWER},
        REANSWER: {STEP, FINISH, SUBQUESTION},
        STEP: {STEP, FINISH},
        FINISH: set(),  # A2 ends the trajectory
    }
    space = RStarConfig(num_steps=3, num_subquestions=2).action_space()
    assert [ACTIONS[t] for t in space.slot_types()] == [STEP] * 3 + [FINISH] + [SUBQUESTION] * 2 + [REANSWER, REPHRASE]


def test_bad_tables_and_templates_name_the_problem():
    with pytest.raises(ValueError, match="'step' with no valid action"):
        RStarConfig(allowed_after={ROOT: (STEP,)})
    with pytest.raises(ValueError, match=r"allowed_after.root: unknown actions \['jump'\]"):
        RStarConfig(allowed_after={ROOT: ("jump",)})
    with pytest.raises(ValueError, match="unknown node type 'leaf'"):
        RStarConfig(allowed_after={**RStarConfig().allowed_after, "leaf": (STEP,)})
    with pytest.raises(ValueError, match="'reanswer' needs a sub-question"):
        RStarConfig(allowed_after={**RStarConfig().allowed_after, ROOT: (REANSWER, FINISH)})
    with pytest.raises(ValueError, match=r"prompts.prompt: the template has no '\{question\}'"):
        RStarPrompts(prompt="Solve: {problem}\n")
    with pytest.raises(ValueError, match="num_votes must be >= 1"):
        RStarConfig(num_votes=0)


def test_answers_are_the_last_number_and_majority_counts_every_sample():
    keys = AnswerKeys.build(TOKENIZER, CONFIG.vocab_size)
    texts = [["4 + 9 = 13\nThe answer is 13", "so 113", "x 13.", "no number"],
             ["7", "The answer is 8", "no", "none"]]
    ids = [[TOKENIZER.encode(t, add_special_tokens=False) for t in row] for row in texts]
    width = max(len(t) for row in ids for t in row)
    tokens = jnp.asarray([[t + [0] * (width - len(t)) for t in row] for row in ids])
    lengths = jnp.asarray([[len(t) for t in row] for row in ids])
    k, has = keys.keys(tokens, lengths)
    assert has.tolist() == [[True, True, True, False], [True, True, False, False]]
    winner, share, same = majority(k, has)
    assert winner.tolist() == [0, 0]  # 13 twice ("113" is another number); a tie goes to the first
    np.testing.assert_allclose(share, [0.5, 0.25])  # samples with no answer count in the denominator
    assert same[0].tolist()[0] == [True, False, True, False]


def _text(ids) -> str:
    return TOKENIZER.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def _check_bookkeeping(tree, row: int, config: RStarConfig) -> list[str]:
    """Asserts every created node of `row` follows from its parent and the action taken; returns the node types."""
    e = jax.tree.map(lambda x: np.asarray(x[row]), tree.embeddings)
    visits, parents = np.asarray(tree.node_visits[row]), np.asarray(tree.parents[row])
    actions = np.asarray(tree.action_from_parent[row])
    allowed, slot_types = _allowed(config), config.action_space().slot_types()
    cues = {SUBQUESTION: "Question: ", REANSWER: "Answer: ", REPHRASE: "Conditions: "}
    types = []
    for n in np.flatnonzero(visits > 0)[1:]:
        p, a = parents[n], actions[n]
        if e.terminal[p]:  # a simulation that ends at a terminal node backs it up again: its copy, free
            assert e.length[n] == e.length[p] and e.reward[n] == e.reward[p] and e.generated_tokens[n] == 0
            np.testing.assert_array_equal(e.tokens[n], e.tokens[p])
            continue
        kind, parent_kind = ACTIONS[slot_types[a]], ROOT if e.node_type[p] == len(ACTIONS) else ACTIONS[e.node_type[p]]
        types.append(kind)
        assert ACTIONS[e.node_type[n]] == kind and kind in allowed[parent_kind] and e.depth[n] == e.depth[p] + 1
        start = e.subquestion_end[p] if kind == REANSWER else e.length[p]
        assert start >= 0  # A4 only below a sub-question
        piece = e.candidates[p, a, : e.candidate_len[p, a]]
        assert e.length[n] == start + len(piece)
        np.testing.assert_array_equal(e.tokens[n, :start], e.tokens[p, :start])  # the subtree keeps the text above
        np.testing.assert_array_equal(e.tokens[n, start:e.length[n]], piece)
        if kind in cues:
            assert _text(e.tokens[n, start:e.length[n]]).startswith(cues[kind])
        if kind == SUBQUESTION:
            assert e.subquestion_end[n] == start + e.candidate_subquestion[p, a]
            assert _text(e.tokens[n, e.subquestion_end[n]:e.length[n]]).startswith("Answer: ")
        else:  # A4 re-answers the same sub-question; the other actions keep the last one
            assert e.subquestion_end[n] == e.subquestion_end[p]
        ended = e.candidate_ends[p, a] or e.depth[n] >= config.max_depth
        dead_end = not np.any(np.asarray(tree.children_prior_logits[row, n]) > INVALID_LOGIT / 2)
        assert e.terminal[n] == (ended or dead_end)
        if kind == FINISH:
            assert e.terminal[n]
    return types


def test_each_action_builds_its_node_from_the_parent(policy):
    [(tree, _)] = trees(policy, CHAIN)
    chain = [REPHRASE, SUBQUESTION, REANSWER, FINISH]
    full = []
    for row in range(len(PROBLEMS)):
        types = _check_bookkeeping(tree, row, CHAIN)
        # a random policy's line may end the trajectory early (EOS), and then the path stops there
        assert types == chain[:len(types)]
        if types == chain:
            full.append(row)
    assert full
    for row in full:
        e = jax.tree.map(lambda x: np.asarray(x[row]), tree.embeddings)
        conditions = _text(e.tokens[1, : e.length[1]])
        question = _text(e.tokens[2, e.length[1]:e.subquestion_end[2]])
        for n in (2, 3, 4):  # the rephrased question stays in the text the subtree continues
            assert _text(e.tokens[n, : e.length[n]]).startswith(conditions)
        assert _text(e.tokens[3, : e.length[3]]).startswith(conditions + question + "Answer: ")
        # A4's answer replaced A3's: the text below the sub-question differs only after it
        assert e.subquestion_end[3] == e.subquestion_end[2]
        [finish] = [t for t in finished_trajectories(tree, row, CHAIN, TOKENIZER, TASK) if t.node == 3]
        assert finish.action == FINISH and finish.text == _text(e.tokens[4, : e.length[4]])
        assert 0 <= finish.score <= 1


def test_paper_table_trees_follow_the_table(batched):
    seen = set()
    for row in range(len(PROBLEMS)):
        types = _check_bookkeeping(batched, row, SMALL)
        seen |= set(types)
    assert {STEP, FINISH, SUBQUESTION, REPHRASE} <= seen
    calls = np.asarray(batched.embeddings.model_calls)[:, 0]
    # root: A1 x 2, A2 x n, A3 x (1 + v), A5 x 1 (no sub-question yet: A4 samples nothing)
    assert calls.tolist() == [2 + 2 + 3 + 1] * 3


def test_batched_trees_equal_one_problem_at_a_time(policy, batched):
    alone = trees(policy, dataclasses.replace(SMALL, batch_size=1))
    assert [real for _, real in alone] == [1, 1, 1]
    for row, (tree, _) in enumerate(alone):
        np.testing.assert_array_equal(tree.node_visits[0], batched.node_visits[row])
        np.testing.assert_array_equal(tree.children_index[0], batched.children_index[row])
        for name in ("tokens", "length", "candidates", "candidate_len", "generated_tokens"):
            np.testing.assert_array_equal(getattr(tree.embeddings, name)[0], getattr(batched.embeddings, name)[row],
                                          err_msg=f"problem {row}: {name}")


def test_trees_split_over_a_mesh_equal_unsplit(policy, batched):
    mesh = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    [(tree, real)] = list(rstar_trees(PROBLEMS, policy=policy, tokenizer=TOKENIZER, task=TASK, config=SMALL, key=KEY,
                                      mesh=mesh))
    assert real == 3 and tree.node_visits.shape[0] == 4  # the batch rounded up to a multiple of the devices
    for name in ("tokens", "candidates", "generated_tokens"):
        np.testing.assert_array_equal(getattr(tree.embeddings, name)[:3], getattr(batched.embeddings, name))


def test_a_verifier_replaces_the_majority_confidence(policy):
    """Every finishing candidate's reward is the verifier's value of the prompt, the node's text (up to the last
    sub-question for an A4 candidate) and the candidate, read straight from the value model; on CHAIN's path
    through every kind of node."""
    value_model = ValueModel(CONFIG, rngs=nnx.Rngs(5))
    value_model.head[...] = jax.random.normal(jax.random.key(6), value_model.head.shape)  # values that differ
    [(tree, _)] = list(rstar_trees(PROBLEMS, policy=policy, tokenizer=TOKENIZER, task=TASK, config=CHAIN, key=KEY,
                                   verifier=ValueVerifier(value_model)))
    slot_types = CHAIN.action_space().slot_types()
    checked, read = 0, 0
    for row, problem in enumerate(PROBLEMS):
        prompt = prompt_ids(TOKENIZER, CHAIN.prompts.prompt.format(question=problem.question))
        e = jax.tree.map(lambda x: np.asarray(x[row]), tree.embeddings)
        created = np.flatnonzero(np.asarray(tree.node_visits[row]) > 0)
        read += e.verifier_tokens[created].sum()
        prior = np.asarray(tree.children_prior_logits[row])
        for n in created[~e.terminal[created]]:
            for k in np.flatnonzero(e.candidate_ends[n] & (prior[n] > INVALID_LOGIT / 2)):
                start = e.subquestion_end[n] if ACTIONS[slot_types[k]] == REANSWER else e.length[n]
                ids = jnp.asarray([prompt + e.tokens[n, :start].tolist()
                                   + e.candidates[n, k, :e.candidate_len[n, k]].tolist()])
                expected = jax.nn.sigmoid(value_model(ids, jnp.ones_like(ids))[0, -1])
                assert e.candidate_values[n, k] == pytest.approx(float(expected), abs=2e-4)
                checked += 1
    assert checked > 0 and read > 0
