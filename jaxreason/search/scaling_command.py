"""`python -m jaxreason scaling --config configs/scaling/NAME.yaml [key.sub=value ...]`: the test-time compute
scaling study (`jaxreason.search.scaling`) as a resumable run.

    policy_0 <- SFT(policy, gold solutions)                                stage "sft" (optional)
    PRM_0    <- rollout-labelled warm-up data, as ReST-MCTS*'s PRM_0       stages "warmup_data", "prm_0"
                (skipped when verifier.path names a trained verifier)
    pool     <- N samples per held-out problem, scored by the verifier     stage "pool"
    each configured method setting over the held-out problems            stages "run_<label>"
    the study: bins, budgets, compute-optimal choice -> metrics.json, report.md, PNG plots

Every finished stage is in `run_dir/stages.json` (training stages also checkpoint under `run_dir/<stage>/`), so a
second invocation with the same config redoes nothing it finished and rewrites the report. In a multi-process job
every process runs every stage (the searches split over all processes' devices); process 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator

import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import value_model_from, value_parameters
from jaxreason.algorithms.rest_mcts import WarmupConfig
from jaxreason.algorithms.rollout_labels import rollout_value_traces
from jaxreason.algorithms.store_run import StoreRun, run_with_store
from jaxreason.config import from_dict
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import FLAG_ROLLOUT
from jaxreason.distributed import is_main_process
from jaxreason.models.spec import ModelSpec
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.prompts import eos_ids, prompt_ids
from jaxreason.search.command import VerifierConfig, load_verifier
from jaxreason.search.config import Budget
from jaxreason.search.methods import method_names, run
from jaxreason.search.scaling import Setting, analyse, pool_settings
from jaxreason.search.scaling_report import write_scaling_report
from jaxreason.search.votes import group_answers
from jaxreason.tasks.base import TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.metrics import progress
from jaxreason.train.objectives import sft_objective, value_objective
from jaxreason.train.sft import LoRAConfig
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.positions import StepSplitter
from jaxreason.verifiers.value import ValueVerifier

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
    """The task's problems: from its train split the first `gold` (policy_0's SFT) and the next `warmup` (PRM_0's
    data), unused when there is nothing to train; from its test split the study's `test` held-out problems, halved
    into validation and test."""

    task: TaskSpec = TaskSpec()
    gold: int = 0
    warmup: int = 64
    test: int = 128


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """One pool of `num_samples` solutions per held-out problem (drawn with `budget.baseline.sampling`), from which
    self-consistency, best-of-n and verifier-weighted vote at n = 1, 2, 4, ..., num_samples are computed
    (averaged over up to `max_subsets` subsets of n samples); the pool's pass rate is each problem's difficulty."""

    num_samples: int = 16
    max_subsets: int = 70

    def __post_init__(self):
        if self.num_samples < 1 or self.max_subsets < 1:
            raise ValueError(f"pool.num_samples and pool.max_subsets must be >= 1, got {self}")

    @property
    def sizes(self) -> list[int]:
        powers = [2 ** k for k in range(self.num_samples.bit_length()) if 2 ** k < self.num_samples]
        return [*powers, self.num_samples]


@dataclasses.dataclass(frozen=True)
class MethodSetting:
    """One run of a registered test-time method over the held-out problems. `budget` overrides the study's budget
    field by field (`{mcts: {num_simulations: 8}}`); `name` labels it (default: the method and the overridden
    values, e.g. "mcts(num_simulations=8)")."""

    method: str
    budget: dict = dataclasses.field(default_factory=dict)
    name: str | None = None

    def __post_init__(self):
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(method_names())}")

    def budget_over(self, base: Budget) -> Budget:
        return from_dict(Budget, self.budget, f"runs ({self.label})", "budget.", base)

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        values = ", ".join(f"{k}={v}" for k, v in _leaves(self.budget))
        return f"{self.method}({values})" if values else self.method


def _leaves(tree: dict) -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        yield from _leaves(value) if isinstance(value, dict) else [(key, value)]


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """The study: the policy (trained here from `sft`, or as given), the verifier, the held-out problems, the pool
    and the method runs, and how the problems are binned."""

    policy: ModelSpec
    # A trained verifier (a value-model folder or a ReST-MCTS* run's folder); null: PRM_0 is trained here.
    verifier: VerifierConfig = VerifierConfig()
    problems: ProblemsConfig = ProblemsConfig()
    run_dir: str = "runs/scaling"
    seed: int = 0
    chat: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    sft: FitConfig | None = None  # policy_0 <- SFT of `policy` on the gold solutions; null: the policy as given
    warmup: WarmupConfig = WarmupConfig()
    prm_train: FitConfig = FitConfig()
    prm_loss: str = "bce"  # mse | bce
    # As ReST-MCTS*'s: the PRM reads its LM's solution likelihood; prm_train_backbone false trains its head alone
    prm_likelihood: bool = False
    prm_train_backbone: bool = True
    prm_lora: LoRAConfig | None = None
    budget: Budget = Budget()  # the pool's sampling and every run's settings, before a run's overrides
    pool: PoolConfig = PoolConfig()
    runs: tuple[MethodSetting, ...] = (MethodSetting("greedy"),)
    num_bins: int = 5  # difficulty bins (quantiles of the pool's pass rate)
    reference: str = "best_of_n"  # the pool rule the compute-optimal strategy is measured against
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.prm_loss not in ("mse", "bce"):
            raise ValueError(f"prm_loss must be 'mse' or 'bce', got {self.prm_loss!r}")
        value_parameters(self.prm_train_backbone, self.prm_lora is not None)  # the two settings agree
        if self.reference not in ("self_consistency", "best_of_n", "weighted_vote"):
            raise ValueError(f"reference must be a pool rule (self_consistency, best_of_n, weighted_vote), got "
                             f"{self.reference!r}")
        if self.num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {self.num_bins}")
        if self.problems.test < 2:
            raise ValueError(f"problems.test must be >= 2 (a validation and a test half), got {self.problems.test}")
        if self.sft is not None and self.problems.gold < 1:
            raise ValueError("sft is set but problems.gold is 0: no gold solutions to train on")
        if self.verifier.path is None and self.problems.warmup < 1:
            raise ValueError("verifier.path is null, so PRM_0 is trained here, but problems.warmup is 0")
        labels = [s.label for s in self.runs]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"runs: label {repeated[0]!r} is used twice; give the runs distinct `name`s")
        for setting in self.runs:
            setting.budget_over(self.budget)  # a bad key fails here, naming it, not hours into the run


def run_scaling(config: ScalingConfig) -> dict:
    """Runs (or continues) the study; returns the metrics also written to run_dir/metrics.json."""
    p = config.problems
    return run_with_store(config, lambda c, tokenizer, resume: StoreRun.open(
        c, tokenizer, resume, p.gold + p.warmup, "problems.gold + problems.warmup"), _study, resume=True)


def _study(r: StoreRun, policy) -> None:
    c = r.config
    if c.sft is not None:
        gold = gold_traces(r.task, r.tokenizer, r.pool[:c.problems.gold], list(range(c.problems.gold)), chat=c.chat)
        r.train_model("sft", policy, sft_objective, gold, c.sft,
                      lambda t: sft_batch(t, c.sft.max_len, r.pad_id, r.tokenizer.eos_token_id))
    verifier = load_verifier(c.verifier, policy) if c.verifier.path is not None else _train_prm(r, policy)
    r.stages.run("pool", lambda: _pool(r, policy, verifier))
    with progress(len(c.runs), description="methods") as bar:
        for setting in c.runs:
            r.stages.run(f"run_{setting.label}", lambda s=setting: _run_setting(r, s, policy, verifier))
            bar.update()
    settings, pass_rates, tokens_per_sample = study_settings(c, r.stages.results)
    metrics = analyse(settings, pass_rates, tokens_per_sample, num_bins=c.num_bins, seed=c.seed,
                      reference=c.reference)
    metrics["seconds"] = {name: result["seconds"] for name, result in r.stages.results.items() if "seconds" in result}
    if is_main_process():  # every process ran every stage; one writes
        (r.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_scaling_report(r.run_dir, dataclasses.asdict(c), metrics)


def _train_prm(r: StoreRun, policy) -> Verifier:
    """PRM_0 as ReST-MCTS* trains it: a value model on policy_0's backbone (a copy), trained on rollout-labelled
    solutions of the warm-up problems (kept in the run's trace store, so a resumed run restores the PRM)."""
    c = r.config
    prm = value_model_from(policy, c.seed, likelihood=c.prm_likelihood, lora=c.prm_lora)
    r.stages.run("warmup_data", lambda: _warmup_data(r, policy))
    traces = r.store.read(r.store.select(iteration=0, flags_all=FLAG_ROLLOUT))
    r.train_model("prm_0", prm, value_objective(c.prm_loss), traces, c.prm_train,
                  lambda t: value_batch(t, c.prm_train.max_len, r.pad_id),
                  trainable=value_parameters(c.prm_train_backbone, bool(c.prm_lora)))
    return ValueVerifier(prm, aggregation=c.verifier.aggregation)


def _warmup_data(r: StoreRun, policy) -> dict:
    c = r.config
    w, first = c.warmup, c.problems.gold
    ids = list(range(first, first + c.problems.warmup))
    traces, generated = rollout_value_traces(
        policy, r.tokenizer, r.task, [r.pool[i] for i in ids], ids, num_rollouts=w.num_rollouts,
        key=r.key_for("warmup"), sampling=w.sampling, max_steps=w.max_steps, chat=c.chat,
        rollout_traces=w.rollout_traces, mesh=r.mesh)
    if not len(r.store.select(iteration=0, flags_all=FLAG_ROLLOUT)):  # an earlier run killed before logging
        r.append(traces)
    return {"traces": len(traces), "generated_tokens": generated}


def _pool(r: StoreRun, policy, verifier: Verifier) -> dict:
    """`pool.num_samples` solutions per held-out problem with their correctness, answer groups, verifier scores and
    tokens ([P][N] lists)."""
    start = time.perf_counter()
    c, n = r.config, r.config.pool.num_samples
    prompts = [prompt_ids(r.tokenizer, r.task.prompt(p), chat=c.chat) for p in r.test for _ in range(n)]
    samples = sample_continuations(policy, prompts, r.key_for("pool"), c.budget.baseline.sampling,
                                   eos_ids=eos_ids(r.tokenizer, policy.config), pad_id=r.pad_id, description="pool",
                                   mesh=r.mesh)
    texts = [r.tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in samples]
    correct = r.task.check_many([p for p in r.test for _ in range(n)], texts)
    scored = score_solutions(verifier, prompts, samples, StepSplitter(r.tokenizer, r.task.step_delimiter),
                             pad_id=r.pad_id, mesh=r.mesh)

    def rows(x) -> list[list]:
        return np.asarray(x).reshape(len(r.test), n).tolist()

    return {"correct": rows(correct),
            "groups": [group_answers([r.task.extract_answer(t) for t in texts[i:i + n]]).tolist()
                       for i in range(0, len(texts), n)],
            "scores": rows(scored.scores), "generated_tokens": rows([len(s) for s in samples]),
            "verifier_tokens": rows(scored.verifier_tokens), "seconds": round(time.perf_counter() - start, 1)}


def _run_setting(r: StoreRun, setting: MethodSetting, policy, verifier: Verifier) -> dict:
    c = r.config
    result = run(setting.method, r.test, policy=policy, verifier=verifier, tokenizer=r.tokenizer, task=r.task,
                 budget=setting.budget_over(c.budget), key=r.key_for(setting.label), chat=c.chat, mesh=r.mesh)
    log.info("%s: accuracy %.3f", setting.label, result.accuracy)
    return {"correct": [bool(x) for x in result.correct], "generated_tokens": result.generated_tokens.tolist(),
            "verifier_tokens": result.verifier_tokens.tolist(), "seconds": round(result.seconds, 1)}


def study_settings(config: ScalingConfig, stages: dict) -> tuple[list[Setting], np.ndarray, float]:
    """The settings measured by the finished stages (the pool's rules, then the runs in config order), each held-out
    problem's pass rate in the pool, and the pool's mean generated tokens per sample (one samples-equivalent)."""
    pool = stages["pool"]
    correct, lengths = np.asarray(pool["correct"], np.float64), np.asarray(pool["generated_tokens"], np.float64)
    settings = pool_settings(np.asarray(pool["groups"]), correct, np.asarray(pool["scores"]), lengths,
                             np.asarray(pool["verifier_tokens"], np.float64), config.pool.sizes,
                             config.pool.max_subsets, config.seed)
    for s in config.runs:
        result = stages[f"run_{s.label}"]
        settings.append(Setting(s.label, s.method, np.asarray(result["correct"], np.float64),
                                np.asarray(result["generated_tokens"], np.float64),
                                np.asarray(result["verifier_tokens"], np.float64)))
    return settings, correct.mean(axis=1), float(lengths.mean())
