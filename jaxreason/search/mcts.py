"""Verifier-guided step-level MCTS over a batch of problems: one jit-compiled program from prompts to tree.

The root and recurrent functions come from `expansion.StepSearch`, the selection rule and backup from
`selection.run_mcts` (ReST-MCTS*'s UCT, MuZero or Gumbel MuZero). The answer of a problem is its best
finished solution by verifier score (ReST-MCTS*'s choice); a search that finished none answers with the best
path by value.

The models' weights are read in their compute dtype and, with a mesh, laid out by the training rules
(`jaxreason.sampling.placement`): sharded over `fsdp` and `tensor`, replicated on a mesh of `data` alone. On such
a mesh each device searches its share of a batch (`sharding.split_over_data`): problems do not interact during
search, so nothing crosses devices until the trees come back. A row draws the same random numbers as in an
unsplit search, so under ReST-MCTS*'s deterministic rule the trees are the same; under MuZero and Gumbel MuZero
each device draws its own root noise (and samples), so their trees differ from an unsplit search's as another
key's would. On a mesh that shards the weights, the unsplit search is one program that XLA partitions: rows over
`data` x `fsdp`, the models as their weights lie; its trees are the unsplit search's under every rule.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import mctx
import numpy as np
from jax.sharding import Mesh

from jaxreason import distributed, sharding
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.buckets import round_up
from jaxreason.sampling.placement import inference_state
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.search.actions import ActionSpace
from jaxreason.search.config import Budget, MCTSConfig
from jaxreason.search.expansion import ExpansionSpec, StepSearch, build_step_tables
from jaxreason.search.methods import MethodResult, register_method
from jaxreason.search.selection import run_mcts
from jaxreason.search.traces import TreeTraces, extract_traces
from jaxreason.search.votes import best_of, weighted_vote
from jaxreason.tasks.base import Problem, Task
from jaxreason.train.metrics import progress
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.value import ValueVerifier


def batched_trees(
    problems: Sequence[Problem],
    *,
    policy: CausalLM,
    verifier: Verifier,
    tokenizer,
    task: Task,
    config: MCTSConfig,
    key: jax.Array,
    chat: bool = False,
    action_space: ActionSpace | None = None,
    mesh: Mesh | None = None,
) -> Iterator[tuple[mctx.Tree, int]]:
    """The search's mctx trees, one batch at a time, with how many of each batch's rows are real problems.

    Problems go through the jitted search `config.batch_size` at a time (the last batch padded with copies of
    its last problem, so every call has the same shape), batch i with `fold_in(key, i)`. The models run on
    `search_params` (their weights in their compute dtype). With `mesh`, a batch is split over its batch axes
    (rounded up to a multiple of `data` x `fsdp`) and the weights are sharded by the rules; a one-device mesh
    is the same as none. A tree's embeddings are `NodeState`s.
    """
    space = action_space or ActionSpace.single_step(config.num_candidates)
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]
    longest = max(len(p) for p in prompts)
    max_len = round_up(longest + config.max_depth * config.max_step_tokens, 64)
    tokens = np.full((len(prompts), max_len), pad_token_id(tokenizer), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = ids
    prompt_len = np.asarray([len(p) for p in prompts], np.int32)
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    batch = sharding.split_rows(min(config.batch_size, len(prompts)), mesh)

    spec = ExpansionSpec(
        max_len=max_len, max_depth=config.max_depth, sampling=config.sampling, prompt_width=round_up(longest, 16),
        rollout_steps=config.rollout_steps, rollout_alpha=config.rollout_alpha, pad_id=pad_token_id(tokenizer),
        eos_ids=eos_ids(tokenizer, policy.config),
        verifier_shares_backbone=isinstance(verifier, ValueVerifier) and verifier.shares_backbone(policy),
        expansion_sizes=config.expansion_sizes, prefill_packing=config.prefill_packing,
        visit_best_child=config.backup == "children_mean",
    )
    tables = build_step_tables(tokenizer, space, task.step_delimiter, task.answer_prefix, policy.config.vocab_size)
    (policy_def, verifier_def), params = search_params(policy, verifier, mesh)  # once, not per batch
    split = mesh if mesh is not None and not sharding.shards_weights(mesh) else None
    program = _search_program(policy_def, verifier_def, space, spec, config, split)
    if mesh is not None:
        tables = jax.device_put(tables, sharding.replicated(mesh))
    for i, start in enumerate(range(0, len(prompts), batch)):
        rows = np.minimum(np.arange(start, start + batch), len(prompts) - 1)  # pad with the last problem
        row_args = (jnp.asarray(tokens[rows]), jnp.asarray(prompt_len[rows]))
        if mesh is not None:
            row_args = jax.device_put(row_args, (sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)))
        yield program(params, tables, jax.random.fold_in(key, i), *row_args), min(batch, len(prompts) - start)


def search_params(policy: CausalLM, verifier: Verifier, mesh: Mesh | None = None):
    """The graph definitions of the policy and the verifier, and the state the search reads: each model's
    weights in its compute dtype, sharded by the rules over `mesh` (`placement.inference_state`)."""
    (policy_def, policy_state), (verifier_def, verifier_state) = (inference_state(m, mesh) for m in (policy, verifier))
    return (policy_def, verifier_def), (policy_state, verifier_state)


def search_trees(problems: Sequence[Problem], *, policy: CausalLM, verifier: Verifier, tokenizer, task: Task,
                 config: MCTSConfig, key: jax.Array, chat: bool = False, action_space: ActionSpace | None = None,
                 mesh: Mesh | None = None) -> tuple[MethodResult, list[TreeTraces]]:
    """Searches every problem (`batched_trees`); returns the method's answers and each problem's traces
    (decoded)."""
    started = time.perf_counter()
    traces, generated, verified = [], [], []
    with progress(len(problems), description="mcts") as bar:
        for tree, real in batched_trees(problems, policy=policy, verifier=verifier, tokenizer=tokenizer, task=task,
                                        config=config, key=key, chat=chat, action_space=action_space, mesh=mesh):
            tree = distributed.addressable(tree)  # a multi-host job's trees span the processes' devices
            traces += [t.decode(tokenizer) for t in extract_traces(tree, tokenizer=None)[:real]]
            visited = np.asarray(tree.node_visits) > 0
            generated.append((np.asarray(tree.embeddings.generated_tokens) * visited).sum(axis=1)[:real])
            verified.append((np.asarray(tree.embeddings.verifier_tokens) * visited).sum(axis=1)[:real])
            bar.update(real)

    completions = [_answer_text(t, task, config.answer) for t in traces]
    answers = [task.extract_answer(c) for c in completions]
    correct = task.check_many(problems, completions)
    result = MethodResult(method="mcts", completions=completions, answers=answers, correct=correct,
                          generated_tokens=np.concatenate(generated).astype(np.int64),
                          verifier_tokens=np.concatenate(verified).astype(np.int64),
                          seconds=time.perf_counter() - started)
    return result, traces


def mcts(problems, *, policy, verifier, tokenizer, task, budget: Budget, key, chat=False, mesh=None) -> MethodResult:
    """The registered test-time method: `search_trees` with `budget.mcts`, answers only."""
    return search_trees(problems, policy=policy, verifier=verifier, tokenizer=tokenizer, task=task, config=budget.mcts,
                        key=key, chat=chat, mesh=mesh)[0]


def _answer_text(traces: TreeTraces, task: Task, rule: str) -> str:
    """The search's answer: the best-scored finished solution ("best_score"), or the answer whose finished
    solutions' scores sum highest, represented by its best one ("weighted_vote"; the finished candidates no
    simulation took vote too); the best path by value when nothing finished."""
    finished = list(traces.terminals) + (list(traces.sampled_solutions) if rule == "weighted_vote" else [])
    if not finished:
        return traces.best_by_value.text
    scores = [p.scores[-1] for p in finished]
    if rule == "weighted_vote":
        return finished[weighted_vote([task.extract_answer(p.text) for p in finished], scores)].text
    return finished[best_of(scores)].text


@functools.lru_cache(maxsize=16)
def _search_program(policy_def, verifier_def, space: ActionSpace, spec: ExpansionSpec, config: MCTSConfig,
                    mesh: Mesh | None = None):
    """The jitted prompts -> tree program, cached per (models, action space, sizes, rule, mesh); with a mesh
    (of `data` alone), split over its devices."""

    def program(params, tables, key, tokens, prompt_len):
        root_key, search_key = jax.random.split(key)
        if mesh is None:
            search = StepSearch(policy_def, verifier_def, space, spec, tables)
        else:  # this device's rows of the batch
            rows, part = tokens.shape[0], jax.lax.axis_index("data")
            search = StepSearch(policy_def, verifier_def, space, spec, tables, first_row=part * rows,
                                total_rows=rows * mesh.shape["data"])
            if config.rule != "rest_mcts":  # root noise of its own on each device, not the same draws on each
                search_key = jax.random.fold_in(search_key, part)
        prompts = search.encode_prompts(params, tokens, prompt_len)
        root = search.root_fn(params, root_key, prompts)
        recurrent_fn = functools.partial(search.recurrent_fn, prompts=prompts)
        return run_mcts(params, search_key, root, recurrent_fn, rule=config.rule,
                        num_simulations=config.num_simulations, max_depth=config.max_depth + 1, c=config.c,
                        unvisited=config.unvisited, unvisited_bonus=config.unvisited_bonus, backup=config.backup)

    if mesh is None:
        return jax.jit(program)
    # Each device's search is the unsplit program on its rows; the arguments come laid out (see the caller).
    return jax.jit(sharding.split_over_data(program, mesh, (False, False, False, True, True)))


register_method("mcts", mcts, needs_verifier=True)
