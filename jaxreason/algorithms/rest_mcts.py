"""ReST-MCTS* (Zhang et al., 2024, arXiv 2406.03816): self-training of a policy and its PRM by PRM-guided search.

    policy_0 <- SFT(base, gold solutions)                                   stage "sft" (optional)
    PRM_0    <- regression on rollout-labelled prefixes (Math-Shepherd)      stages "warmup_data", "prm_0"
    for t = 1 .. T:
        trees    <- MCTS*(policy_{t-1}, PRM_{t-1}) over the training problems        stage "search_t"
        samples  <- value targets inferred on every tree with a correct leaf (trace store)
        PRM_t    <- PRM_{t-1} trained on all value samples so far                    stage "prm_t"
        policy_t <- SFT(policy_0 or policy_{t-1}, correct search traces)              stage "policy_t"
        ReST-EM  <- sampling at the same generated-token budget, SFT on the correct   stages "rest_em_*_t"
        evaluate both on held-out problems                                           stage "eval_t"

Every stage's result lands in `run_dir/stages.json`, traces in the tensorstore store `run_dir/traces`, model
states in orbax checkpoints under `run_dir/<stage>/`; `resume=True` continues from the last finished stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.report import EM_METHODS, write_report
from jaxreason.algorithms.rest_em import sample_solutions
from jaxreason.algorithms.rollout_labels import rollout_value_traces
from jaxreason.algorithms.stages import StageLog
from jaxreason.algorithms.value_targets import tree_value_traces
from jaxreason.config import to_dict
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import (FLAG_BASELINE, FLAG_CORRECT, FLAG_ROLLOUT, FLAG_SEARCH, Trace,
                                        TraceStore)
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import pad_token_id, prompt_ids
from jaxreason.search.baselines import BaselineConfig
from jaxreason.search.mcts import MCTSConfig, mcts
from jaxreason.search.run import METHODS, Budget, run
from jaxreason.tasks import get_task
from jaxreason.tasks.base import Problem, Task
from jaxreason.train.fit import FitConfig, fit
from jaxreason.train.objectives import sft_objective, value_objective

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
    """Disjoint slices of the task's train split (gold SFT, PRM warm-up, self-training) and its test split."""

    task: str = "arith"
    path: str | None = None  # gsm8k / math: the JSONL file
    options: dict = dataclasses.field(default_factory=dict)  # task settings, e.g. arith's max_ops
    gold: int = 256
    warmup: int = 64
    train: int = 128
    test: int = 128


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    num_rollouts: int = 4  # M completions per prefix
    max_new_tokens: int = 64
    temperature: float = 0.7
    max_steps: int = 8


@dataclasses.dataclass(frozen=True)
class RestEMConfig:
    enabled: bool = True
    samples_per_round: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of each iteration's policy (ReST-EM's: greedy and self-consistency only)."""

    methods: tuple[str, ...] = ("greedy", "self_consistency", "best_of_n", "mcts")
    baseline: BaselineConfig = BaselineConfig()
    mcts: MCTSConfig | None = None  # None: the search settings
    # {method: n}: that method is evaluated on the first n held-out problems only (an expensive method on a
    # subset, the cheap ones on all `problems.test`); every method not named gets all of them.
    num_problems: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in (*self.methods, *self.num_problems) if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
        bad = {m: n for m, n in self.num_problems.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
        if bad:
            raise ValueError(f"num_problems must be positive integers, got {bad}")


@dataclasses.dataclass(frozen=True)
class RestMCTSConfig:
    policy: ModelSpec
    problems: ProblemsConfig = ProblemsConfig()
    run_dir: str = "runs/rest_mcts"
    seed: int = 0
    iterations: int = 3
    chat: bool = False  # wrap every prompt in the tokenizer's chat template (instruct models)
    sft: FitConfig | None = FitConfig()  # initial SFT on gold solutions; null skips it (a pretrained policy)
    warmup: WarmupConfig = WarmupConfig()
    prm_train: FitConfig = FitConfig()
    prm_loss: str = "mse"  # mse | bce
    policy_train: FitConfig = FitConfig()
    policy_from_base: bool = True  # train policy_t from policy_0 (else continue from policy_{t-1})
    accumulate: bool = True  # policy data: correct traces of all iterations so far (else the latest only)
    prm_threshold: float | None = None  # keep only correct traces the PRM scores at least this high
    search: MCTSConfig = MCTSConfig()
    rest_em: RestEMConfig = RestEMConfig()
    evaluation: EvalConfig = EvalConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.prm_loss not in ("mse", "bce"):
            raise ValueError(f"prm_loss must be 'mse' or 'bce', got {self.prm_loss!r}")
        too_many = {m: n for m, n in self.evaluation.num_problems.items() if n > self.problems.test}
        if too_many:
            raise ValueError(f"evaluation.num_problems {too_many} exceeds problems.test = {self.problems.test}")


class RunInterrupted(RuntimeError):
    """A training stage was stopped by SIGTERM after checkpointing; `--resume` continues it."""


@dataclasses.dataclass
class _Run:
    """What every stage needs: the config, the problems, the tokenizer, the mesh and the stores.

    Problems are numbered by their place in the training pool (gold, then warm-up, then self-training
    problems); that number is the trace store's problem_id.
    """

    config: RestMCTSConfig
    run_dir: Path
    task: Task
    tokenizer: object
    mesh: jax.sharding.Mesh
    stages: StageLog
    store: TraceStore
    pool: list[Problem]
    test: list[Problem]
    key: jax.Array

    def slice(self, name: str) -> tuple[list[Problem], list[int]]:
        """The problems of slice "gold", "warmup" or "train" and their problem ids."""
        p = self.config.problems
        start = {"gold": 0, "warmup": p.gold, "train": p.gold + p.warmup}[name]
        size = {"gold": p.gold, "warmup": p.warmup, "train": p.train}[name]
        return self.pool[start:start + size], list(range(start, start + size))

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def key_for(self, name: str) -> jax.Array:
        return jax.random.fold_in(self.key, zlib.crc32(name.encode()))

    def traces(self, iterations: Sequence[int], flags: int) -> list[Trace]:
        """Committed traces of those iterations having all of `flags`."""
        rows = [self.store.select(iteration=i, flags_all=flags) for i in iterations]
        return self.store.read(np.concatenate(rows)) if rows else []

    def append_once(self, name: str, traces: Sequence[Trace], iteration: int, flag: int) -> None:
        """Appends a stage's traces unless an earlier run already committed them (killed before logging)."""
        if len(self.store.select(iteration=iteration, flags_all=flag)):
            log.info("stage %s: traces already in the store", name)
        elif traces:
            self.store.append(traces)

    def train_model(self, name: str, model, objective, traces: Sequence[Trace], config: FitConfig, make_batch):
        """Fits `model` in place on `traces` in stage `name` and logs the stage's last loss."""
        if not traces:
            log.warning("stage %s: no training examples; the model stays as it is", name)
            self.stages.run(name, lambda: {"steps": 0, "examples": 0, "final_loss": None})
            return
        config = config.for_examples(len(traces))
        batches = shuffled_batches(lambda idx: make_batch([traces[i] for i in idx]), len(traces),
                                   config.batch_size, self.config.seed)
        result = fit(model, objective, batches, config, mesh=self.mesh, directory=self.run_dir / name,
                     seed=self.config.seed, description=name)
        if result.interrupted:
            raise RunInterrupted(f"stage {name} stopped by SIGTERM at step {result.step} (checkpoint saved)")
        self.stages.run(name, lambda: {"steps": result.step, "examples": len(traces),
                                       "final_loss": result.history[-1]["loss"] if result.history else None})


def run_rest_mcts(config: RestMCTSConfig, resume: bool = False) -> dict:
    """Runs (or resumes) the whole loop; returns the metrics also written to run_dir/metrics.json."""
    c = config
    policy, tokenizer = build_model(c.policy, c.seed)
    if tokenizer is None:
        raise ValueError(f"{c.policy.pretrained}: no tokenizer beside the weights")
    r = _setup(c, tokenizer, resume)
    try:
        _loop(r, policy)
    finally:
        r.store.close()  # releases the writer lock, also when a stage fails
    return json.loads((r.run_dir / "metrics.json").read_text())


def _loop(r: _Run, policy) -> None:
    c = r.config
    eos = r.tokenizer.eos_token_id
    policy_data = lambda traces: sft_batch(traces, c.policy_train.max_len, r.pad_id, eos)  # noqa: E731
    value_data = lambda traces: value_batch(traces, c.prm_train.max_len, r.pad_id)  # noqa: E731

    if c.sft is not None:  # a weak but non-zero start: SFT on a few gold solutions
        r.train_model("sft", policy, sft_objective, _gold_traces(r), c.sft,
                      lambda t: sft_batch(t, c.sft.max_len, r.pad_id, eos))
    base = _snapshot(policy)
    prm = ValueModel(policy.config, rngs=nnx.Rngs(c.seed))  # its own backbone, initialised from policy_0's
    nnx.update(prm.transformer, _snapshot(policy.transformer))
    r.stages.run("warmup_data", lambda: _warmup_data(r, policy))
    r.train_model("prm_0", prm, value_objective(c.prm_loss), r.traces([0], FLAG_ROLLOUT), c.prm_train, value_data)
    r.stages.run("eval_0", lambda: {"rest_mcts": _evaluate(r, policy, prm, c.evaluation.methods), "rest_em": None})
    write_report(r.run_dir, to_dict(c), r.stages.results)

    em_policy = _copy_of(policy, base)
    for t in range(1, c.iterations + 1):
        since = 1 if c.accumulate else t
        search = r.stages.run(f"search_{t}", lambda: _search(r, policy, prm, t))
        r.train_model(f"prm_{t}", prm, value_objective(c.prm_loss),
                      r.traces([0], FLAG_ROLLOUT) + r.traces(range(1, t + 1), FLAG_SEARCH), c.prm_train, value_data)
        correct = _above_threshold(r, prm, _unique(r.traces(range(since, t + 1), FLAG_SEARCH | FLAG_CORRECT)))
        if c.policy_from_base:
            policy = _copy_of(policy, base)
        r.train_model(f"policy_{t}", policy, sft_objective, correct, c.policy_train, policy_data)

        if c.rest_em.enabled:  # the same budget of generated tokens, spent on plain samples
            r.stages.run(f"rest_em_sample_{t}", lambda: _rest_em_sample(r, em_policy, t, search["generated_tokens"]))
            if c.policy_from_base:
                em_policy = _copy_of(em_policy, base)
            r.train_model(f"rest_em_policy_{t}", em_policy, sft_objective,
                          _unique(r.traces(range(since, t + 1), FLAG_BASELINE | FLAG_CORRECT)), c.policy_train,
                          policy_data)
        r.stages.run(f"eval_{t}", lambda: {
            "rest_mcts": _evaluate(r, policy, prm, c.evaluation.methods),
            "rest_em": _evaluate(r, em_policy, None, [m for m in c.evaluation.methods if m in EM_METHODS])
            if c.rest_em.enabled else None})
        write_report(r.run_dir, to_dict(c), r.stages.results)


# ---------------------------------------------------------------- stages


def _gold_traces(r: _Run) -> list[Trace]:
    """The gold solutions of the "gold" slice as (prompt, solution) traces."""
    traces = []
    for problem, pid in zip(*r.slice("gold")):
        if not problem.solution_steps:
            raise ValueError(f"problem {problem.id} has no gold solution steps for the initial SFT")
        prompt = prompt_ids(r.tokenizer, r.task.prompt(problem), chat=r.config.chat)
        solution = r.tokenizer.encode(r.task.format_solution(problem.solution_steps, problem.answer),
                                      add_special_tokens=False)
        traces.append(Trace(problem_id=pid, iteration=0, tokens=np.asarray(prompt + solution, np.int32),
                            prompt_len=len(prompt), step_ends=np.zeros(0, np.int32),
                            step_values=np.zeros(0, np.float32), reward=1.0, flags=FLAG_CORRECT))
    return traces


def _warmup_data(r: _Run, policy) -> dict:
    """Rollout-labelled prefixes of the warm-up problems (iteration 0 in the store)."""
    w = r.config.warmup
    problems, ids = r.slice("warmup")
    traces, generated = rollout_value_traces(
        policy, r.tokenizer, r.task, problems, ids, num_rollouts=w.num_rollouts, key=r.key_for("warmup"),
        sampling=SamplingConfig(max_new_tokens=w.max_new_tokens, temperature=w.temperature),
        max_steps=w.max_steps, chat=r.config.chat)
    r.append_once("warmup_data", traces, 0, FLAG_ROLLOUT)
    targets = np.concatenate([t.step_values for t in traces]) if traces else np.zeros(0)
    return {"traces": len(traces), "generated_tokens": generated,
            "mean_target": float(targets.mean()) if len(targets) else None}


def _search(r: _Run, policy, prm, t: int) -> dict:
    """MCTS* over the training problems; value samples from every tree with a correct leaf go to the store."""
    problems, ids = r.slice("train")
    search = dataclasses.replace(r.config.search, chat=r.config.chat)
    result, trees = mcts(policy, prm, r.tokenizer, r.task, problems, search, r.key_for(f"search_{t}"), mesh=r.mesh)
    samples: list[Trace] = []
    for problem, pid, tree in zip(problems, ids, trees):
        samples += tree_value_traces(tree, lambda path, p=problem: r.task.is_correct(p, path.text), pid, t)
    r.append_once(f"search_{t}", samples, t, FLAG_SEARCH)
    return {"generated_tokens": result.total_tokens, "train_accuracy": result.accuracy,
            "trees_with_correct_leaf": len({s.problem_id for s in samples}), "value_traces": len(samples),
            "correct_traces": sum(bool(s.flags & FLAG_CORRECT) for s in samples), "seconds": round(result.seconds, 1)}


def _rest_em_sample(r: _Run, policy, t: int, token_budget: int) -> dict:
    e = r.config.rest_em
    problems, ids = r.slice("train")
    traces, generated = sample_solutions(
        policy, r.tokenizer, r.task, problems, ids, token_budget=token_budget, samples_per_round=e.samples_per_round,
        sampling=SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature),
        key=r.key_for(f"rest_em_{t}"), iteration=t, chat=r.config.chat)
    r.append_once(f"rest_em_sample_{t}", traces, t, FLAG_BASELINE)
    solved = {tr.problem_id for tr in traces if tr.flags & FLAG_CORRECT}
    return {"generated_tokens": generated, "samples": len(traces), "train_accuracy": len(solved) / len(problems)}


def _evaluate(r: _Run, policy, prm, methods: Sequence[str]) -> dict:
    """{method: {accuracy, problems, tokens_per_problem, seconds}} on the held-out problems (the first
    `evaluation.num_problems[method]` of them where set), the same keys and problems every iteration."""
    ev = r.config.evaluation
    chat = r.config.chat  # one switch for every prompt of the run
    budget = Budget(baseline=dataclasses.replace(ev.baseline, chat=chat),
                    mcts=dataclasses.replace(ev.mcts or r.config.search, chat=chat))
    out = {}
    for method in methods:
        problems = r.test[:ev.num_problems.get(method, len(r.test))]
        result = run(problems, policy, prm, method=method, budget=budget, tokenizer=r.tokenizer, task=r.task,
                     key=r.key_for(f"eval_{method}"), mesh=r.mesh)
        out[method] = {"accuracy": result.accuracy, "problems": len(problems),
                       "tokens_per_problem": result.total_tokens / len(problems), "seconds": round(result.seconds, 1)}
        log.info("eval %s: accuracy %.3f", method, result.accuracy)
    return out


# ---------------------------------------------------------------- helpers


def _unique(traces: list[Trace]) -> list[Trace]:
    """One trace per distinct (problem, token sequence)."""
    seen, out = set(), []
    for t in traces:
        k = (t.problem_id, np.asarray(t.tokens).tobytes())
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def _above_threshold(r: _Run, prm: ValueModel, traces: list[Trace]) -> list[Trace]:
    """The traces whose whole solution the PRM scores >= `prm_threshold` (all of them when it is unset)."""
    if r.config.prm_threshold is None or not traces:
        return traces
    scores = []
    for start in range(0, len(traces), 64):
        batch = value_batch(traces[start:start + 64], r.config.prm_train.max_len, r.pad_id)
        values = np.asarray(prm.values(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])))
        last = batch["attention_mask"].sum(1) - 1
        scores += values[np.arange(len(last)), last].tolist()
    return [t for t, s in zip(traces, scores) if s >= r.config.prm_threshold]


def _snapshot(module: nnx.Module) -> nnx.State:
    """A copy of the module's state in fresh buffers (training donates, and so deletes, the live ones)."""
    return jax.tree.map(jnp.copy, nnx.state(module))


def _copy_of(model: nnx.Module, state: nnx.State) -> nnx.Module:
    """A new module with `model`'s structure and a fresh copy of `state`."""
    graphdef = nnx.graphdef(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _setup(config: RestMCTSConfig, tokenizer, resume: bool) -> _Run:
    run_dir = Path(config.run_dir)
    if (run_dir / "stages.json").exists() and not resume:
        raise ValueError(f"{run_dir} holds a run already: pass --resume to continue it, or set run_dir=NEW")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    as_json = json.loads(json.dumps(to_dict(config)))
    if resume and saved.exists() and json.loads(saved.read_text()) != as_json:
        raise ValueError(f"{saved}: the run was started with a different config; resume it with the same one")
    saved.write_text(json.dumps(as_json, indent=2))
    p = config.problems
    task = get_task(p.task, **({"path": p.path} if p.path else {}), **p.options)
    needed = p.gold + p.warmup + p.train
    pool = task.problems("train", n=needed, seed=config.seed)
    if len(pool) < needed:
        raise ValueError(f"task {p.task}: {len(pool)} training problems, the config needs {needed} "
                         "(problems.gold + problems.warmup + problems.train)")
    store_path = run_dir / "traces"
    if not store_path.exists():
        TraceStore.create(store_path).close()
    return _Run(config=config, run_dir=run_dir, task=task, tokenizer=tokenizer,
                mesh=sharding.make_mesh(config.mesh), stages=StageLog(run_dir), store=TraceStore(store_path, "a"),
                pool=pool, test=task.problems("test", n=p.test, seed=config.seed), key=jax.random.key(config.seed))
