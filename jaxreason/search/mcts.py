"""PRM-guided step-level MCTS over a batch of problems: one jit-compiled program from prompts to tree.

The root and recurrent functions come from `expansion.StepSearch`, the selection rule from
`selection.run_mcts` (ReST-MCTS*'s UCT, MuZero or Gumbel MuZero). The answer of a problem is its best
finished solution by PRM score (ReST-MCTS*'s choice); a search that finished none answers with the best
path by value.

With a mesh, each batch of problems is split over the mesh's devices and every device searches its share
(`jax.shard_map`; the models are replicated): problems do not interact during search, so nothing crosses
devices until the trees come back. A row draws the same random numbers as in an unsplit search, so under
ReST-MCTS*'s deterministic rule the trees are the same; under MuZero and Gumbel MuZero each device draws its
own root noise (and samples), so their trees differ from an unsplit search's as another key's would.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreason.models.llama import CausalLM
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.prompts import pad_token_id, prompt_ids
from jaxreason.search.actions import ActionSpace
from jaxreason.search.baselines import MethodResult
from jaxreason.search.expansion import ExpansionSpec, StepSearch, build_step_tables
from jaxreason.search.selection import run_mcts
from jaxreason.search.traces import TreeTraces, extract_traces
from jaxreason.tasks.base import Problem, Task
from jaxreason.train.metrics import progress


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    rule: str = "rest_mcts"  # rest_mcts | muzero | gumbel
    num_simulations: int = 16
    num_candidates: int = 4  # K: candidate next steps per node (single-step action space)
    max_depth: int = 8  # steps from the root
    max_step_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    c: float = 1.0  # exploration constant
    rollout_steps: int = 0  # ReST-MCTS*'s greedy roll-forward r; 0 disables
    rollout_alpha: float = 0.5
    chat: bool = False  # wrap prompts in the tokenizer's chat template
    batch_size: int = 64  # problems per jitted search call (one compiled shape; a progress bar over calls)
    # Fractions of a device's batch that an expansion is compiled for: the rows to expand run in the smallest
    # that holds them. More sizes waste fewer rows and take longer to compile (each is a copy of the expansion).
    expansion_sizes: tuple[float, ...] = (1.0, 0.75, 0.5)
    # Fractions of an expansion's candidate rows its decode continues with once only that many are unfinished
    # (`SamplingConfig.shrink_at`): steps vary in length, so most rows finish well before the longest. Worth its
    # gathers and compile time on a model whose decode step is costly (SmolLM2-135M on CPU: 0.5 takes 11% off a
    # search); on a tiny model it is slower (BENCHMARKS.md), hence off by default.
    decode_shrink: tuple[float, ...] = ()
    # Fractions of a node prefill's padded tokens (rows x the longest row's steps) its real tokens are packed
    # into for the matmuls (`ExpansionSpec.prefill_packing`; the smallest that holds them runs, all of them if
    # none does). Each is another compiled copy of the prefill.
    prefill_packing: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("num_simulations", "num_candidates", "max_depth", "max_step_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"mcts.{name} must be >= 1, got {getattr(self, name)}")
        if max(self.expansion_sizes, default=0) != 1 or not all(0 < f <= 1 for f in self.expansion_sizes):
            raise ValueError(f"mcts.expansion_sizes must be fractions in (0, 1] that include 1, got "
                             f"{self.expansion_sizes}")
        if not all(0 < f < 1 for f in self.prefill_packing):
            raise ValueError(f"mcts.prefill_packing must be fractions in (0, 1), got {self.prefill_packing}")
        if not all(0 < f < 1 for f in self.decode_shrink):
            raise ValueError(f"mcts.decode_shrink must be fractions in (0, 1), got {self.decode_shrink}")


def mcts(
    policy: CausalLM,
    prm: ValueModel,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    config: MCTSConfig,
    key: jax.Array,
    action_space: ActionSpace | None = None,
    mesh: Mesh | None = None,
) -> tuple[MethodResult, list[TreeTraces]]:
    """Searches every problem; returns the method's answers and each problem's traces (decoded).

    Problems go through the jitted search `config.batch_size` at a time (the last batch padded with copies of
    its last problem, so every call has the same shape), batch i with `fold_in(key, i)`. With `mesh`, a batch
    is split over all its devices (rounded up to a multiple of their number); a one-device mesh is the same
    as none.
    """
    space = action_space or ActionSpace.single_step(config.num_candidates)
    started = time.perf_counter()
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=config.chat) for p in problems]
    longest = max(len(p) for p in prompts)
    max_len = _round_up(longest + config.max_depth * config.max_step_tokens, 64)
    tokens = np.full((len(prompts), max_len), pad_token_id(tokenizer), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = ids
    prompt_len = np.asarray([len(p) for p in prompts], np.int32)
    devices = 1 if mesh is None else mesh.size
    batch = _round_up(min(config.batch_size, len(prompts)), devices)

    spec = ExpansionSpec(
        max_len=max_len, prompt_width=_round_up(longest, 16), max_step_tokens=config.max_step_tokens,
        max_depth=config.max_depth,
        temperature=config.temperature, top_p=config.top_p, rollout_steps=config.rollout_steps,
        rollout_alpha=config.rollout_alpha, pad_id=pad_token_id(tokenizer),
        eos_ids=tuple(policy.config.eos_token_ids) or (tokenizer.eos_token_id,),
        prm_shares_backbone=prm.transformer is policy.transformer, expansion_sizes=config.expansion_sizes,
        decode_shrink=config.decode_shrink, prefill_packing=config.prefill_packing,
    )
    tables = build_step_tables(tokenizer, space, task.step_delimiter, task.answer_prefix, policy.config.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    prm_def, prm_state = nnx.split(prm)
    program = _search_program(policy_def, prm_def, space, spec, config, mesh if devices > 1 else None)
    params = (policy_state, prm_state)
    if devices > 1:  # on every device once, not per batch (trained parameters may be sharded over the mesh)
        params, tables = jax.device_put((params, tables), NamedSharding(mesh, PartitionSpec()))
    traces, generated = [], []
    starts = range(0, len(prompts), batch)
    with progress(len(prompts), description="mcts") as bar:
        for i, start in enumerate(starts):
            rows = np.minimum(np.arange(start, start + batch), len(prompts) - 1)  # pad with the last problem
            real = min(batch, len(prompts) - start)
            tree = program(params, tables, jax.random.fold_in(key, i), jnp.asarray(tokens[rows]),
                           jnp.asarray(prompt_len[rows]))
            traces += [t.decode(tokenizer) for t in extract_traces(tree, tokenizer=None)[:real]]
            visited = np.asarray(tree.node_visits) > 0
            generated.append((np.asarray(tree.embeddings.generated_tokens) * visited).sum(axis=1)[:real])
            bar.update(real)
    generated = np.concatenate(generated)

    completions = [_answer_text(t) for t in traces]
    answers = [task.extract_answer(c) for c in completions]
    correct = [task.is_correct(p, c) for p, c in zip(problems, completions)]
    result = MethodResult(method="mcts", completions=completions, answers=answers, correct=correct,
                          generated_tokens=generated.astype(np.int64), seconds=time.perf_counter() - started)
    return result, traces


def _answer_text(traces: TreeTraces) -> str:
    if traces.terminals:
        return max(traces.terminals, key=lambda p: p.terminal_value).text
    return traces.best_by_value.text


@functools.lru_cache(maxsize=16)
def _search_program(policy_def, prm_def, space: ActionSpace, spec: ExpansionSpec, config: MCTSConfig,
                    mesh: Mesh | None = None):
    """The jitted prompts -> tree program, cached per (models, action space, sizes, rule, mesh)."""

    def program(params, tables, key, tokens, prompt_len):
        root_key, search_key = jax.random.split(key)
        if mesh is None:
            search = StepSearch(policy_def, prm_def, space, spec, tables)
        else:  # this device's rows of the batch
            rows, device = tokens.shape[0], jax.lax.axis_index(mesh.axis_names)
            search = StepSearch(policy_def, prm_def, space, spec, tables, first_row=device * rows,
                                total_rows=rows * mesh.size)
            if config.rule != "rest_mcts":  # root noise of its own on each device, not the same draws on each
                search_key = jax.random.fold_in(search_key, device)
        prompts = search.encode_prompts(params, tokens, prompt_len)
        root = search.root_fn(params, root_key, prompts)
        recurrent_fn = functools.partial(search.recurrent_fn, prompts=prompts)
        return run_mcts(params, search_key, root, recurrent_fn, rule=config.rule,
                        num_simulations=config.num_simulations, max_depth=config.max_depth + 1, c=config.c)

    if mesh is None:
        return jax.jit(program)
    rows, same = PartitionSpec(mesh.axis_names), PartitionSpec()
    # No collectives inside: each device's search is the unsplit program on its rows. check_vma off, since
    # the models' zero-initialised caches and mctx's loop carries would each need a pcast to "varying".
    split = jax.shard_map(program, mesh=mesh, in_specs=(same, same, same, rows, rows), out_specs=rows,
                          check_vma=False)
    replicated, by_row = NamedSharding(mesh, same), NamedSharding(mesh, rows)
    return jax.jit(split, in_shardings=(replicated, replicated, replicated, by_row, by_row), out_shardings=by_row)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
