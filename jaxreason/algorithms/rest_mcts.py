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
A multi-process job runs the same loop on every process, on one shared run folder that process 0 alone writes
(`StoreRun`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence

import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import copy_of, snapshot, value_model_from, value_parameters
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.report import write_report
from jaxreason.algorithms.rest_em import sample_solutions
from jaxreason.algorithms.rollout_labels import rollout_value_traces
from jaxreason.algorithms.stages import export_models
from jaxreason.algorithms.store_run import StoreRun, run_with_store
from jaxreason.algorithms.value_targets import tree_value_traces
from jaxreason.config import to_dict
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import (
    FLAG_BASELINE,
    FLAG_CORRECT,
    FLAG_ROLLOUT,
    FLAG_SEARCH,
    Trace,
    unique_traces,
)
from jaxreason.distributed import is_main_process
from jaxreason.models.spec import ModelSpec
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.search.config import BaselineConfig, Budget, MCTSConfig
from jaxreason.search.mcts import search_trees
from jaxreason.search.methods import method_names, needs_verifier, run
from jaxreason.tasks.base import Problem, TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective, value_objective
from jaxreason.train.sft import LoRAConfig
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.checker import TaskCheckVerifier
from jaxreason.verifiers.evaluation import evaluate_verifier
from jaxreason.verifiers.positions import StepSplitter
from jaxreason.verifiers.value import ValueVerifier

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
    """Disjoint slices of the task's train split (gold SFT, PRM warm-up, self-training) and its test split."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    warmup: int = 64
    train: int = 128
    test: int = 128


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """PRM_0's data: one sampled solution per warm-up problem, M rollouts from each of its step prefixes."""

    num_rollouts: int = 4  # M completions per prefix
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    max_steps: int = 8
    # Every rollout is also a labelled whole solution (its last step's target: its correctness): M more training
    # solutions per prefix from what was sampled anyway.
    rollout_traces: bool = False


@dataclasses.dataclass(frozen=True)
class RestEMConfig:
    enabled: bool = True
    samples_per_round: int = 4
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)


@dataclasses.dataclass(frozen=True)
class VerificationConfig:
    """How well the PRM verifies, on held-out problems: `num_samples` solutions per problem (drawn with
    `evaluation.baseline.sampling`), scored by the PRM; from them, at each n in `sizes`, best-of-n, weighted
    vote, self-consistency, random pick and pass@n (each averaged over subsets of n of the samples), the AUC of
    the PRM's score on correct against incorrect solutions, and (for tasks with process labels) how often the
    first step it scores down is the first wrong step: below the step before it (ReST-MCTS*'s values grow with
    progress, so a wrong step is a drop), or below `first_error_threshold` when set."""

    num_samples: int = 8
    sizes: tuple[int, ...] = (1, 2, 4, 8)
    first_error_threshold: float | None = None

    def __post_init__(self):
        if not self.sizes or not all(1 <= n <= self.num_samples for n in self.sizes):
            raise ValueError(f"verification.sizes must lie in [1, num_samples={self.num_samples}], got {self.sizes}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after every iteration: the test-time `methods` (ReST-EM's policy: those that need no
    verifier) and the verification block (`VerificationConfig`; ReST-EM's: its samples' self-consistency)."""

    methods: tuple[str, ...] = ("greedy", "mcts")
    baseline: BaselineConfig = BaselineConfig()
    mcts: MCTSConfig | None = None  # None: the search settings
    verification: VerificationConfig = VerificationConfig()
    # {method or "verification": n}: evaluated on the first n held-out problems only (an expensive method on a
    # subset, the cheap ones on all `problems.test`); everything not named gets all of them.
    num_problems: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        known = (*method_names(), "verification")
        unknown = [m for m in (*self.methods, *self.num_problems) if m not in known]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(known)}")
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
    prm_aggregation: str = "last"  # how the PRM's step scores make a solution's score: last | min | product
    # The PRM adds its LM's likelihood of the solution (the lowest token log-probability so far, `ValueModel`)
    # to its value head's logit; prm_lm_weight > 0 trains that LM on the correct traces beside the regression.
    prm_likelihood: bool = False
    prm_lm_weight: float = 0.0
    prm_train_backbone: bool = True  # false: only the head (head, bias, scale) trains; the backbone stays policy_0's
    prm_lora: LoRAConfig | None = None  # adapters on the PRM's backbone, trained with its head (null: all weights)
    # What guides the search and scores the held-out samples: "prm", the PRM this run trains (the method); or
    # "task_check", the task's own process labels blurred by `task_check_noise` (`TaskCheckVerifier`), for
    # experiments on how good a verifier must be (the PRM is trained and exported all the same).
    guide: str = "prm"
    task_check_noise: float = 0.0
    # Which tree nodes get value targets: "finished_paths", those on a path to a finished solution (the
    # reference); "all_nodes", every node (an expanded node with no finished descendant gets its nearest
    # ancestor's distance and a negative target).
    value_targets: str = "finished_paths"
    policy_train: FitConfig = FitConfig()
    policy_from_base: bool = True  # train policy_t from policy_0 (else continue from policy_{t-1})
    accumulate: bool = True  # policy data: correct traces of all iterations so far (else the latest only)
    prm_threshold: float | None = None  # keep only correct traces the PRM scores at least this high
    keep_models: int = 0  # exported iterations kept in models/ (policy_<t>, prm_<t>); 0: all
    search: MCTSConfig = MCTSConfig()
    rest_em: RestEMConfig = RestEMConfig()
    evaluation: EvalConfig = EvalConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.prm_loss not in ("mse", "bce"):
            raise ValueError(f"prm_loss must be 'mse' or 'bce', got {self.prm_loss!r}")
        if self.prm_lm_weight < 0:
            raise ValueError(f"prm_lm_weight must be >= 0, got {self.prm_lm_weight}")
        value_parameters(self.prm_train_backbone, self.prm_lora is not None)  # the two settings agree
        if self.guide not in ("prm", "task_check"):
            raise ValueError(f"guide must be 'prm' or 'task_check', got {self.guide!r}")
        if self.value_targets not in ("finished_paths", "all_nodes"):
            raise ValueError(f"value_targets must be 'finished_paths' or 'all_nodes', got {self.value_targets!r}")
        too_many = {m: n for m, n in self.evaluation.num_problems.items() if n > self.problems.test}
        if too_many:
            raise ValueError(f"evaluation.num_problems {too_many} exceeds problems.test = {self.problems.test}")


class _Run(StoreRun):
    """ReST-MCTS*'s run (`StoreRun`): its training pool is the gold, then warm-up, then self-training problems."""

    def slice(self, name: str) -> tuple[list[Problem], list[int]]:
        """The problems of slice "gold", "warmup" or "train" and their problem ids."""
        p = self.config.problems
        start = {"gold": 0, "warmup": p.gold, "train": p.gold + p.warmup}[name]
        size = {"gold": p.gold, "warmup": p.warmup, "train": p.train}[name]
        return self.pool[start:start + size], list(range(start, start + size))

    def traces(self, iterations: Sequence[int], flags: int) -> list[Trace]:
        """Committed traces of those iterations having all of `flags`."""
        rows = [self.store.select(iteration=i, flags_all=flags) for i in iterations]
        return self.store.read(np.concatenate(rows)) if rows else []

    def append_once(self, name: str, traces: Sequence[Trace], iteration: int, flag: int) -> None:
        """Appends a stage's traces unless an earlier run already committed them (killed before logging)."""
        if len(self.store.select(iteration=iteration, flags_all=flag)):
            log.info("stage %s: traces already in the store", name)
        elif traces:
            self.append(traces)


def run_rest_mcts(config: RestMCTSConfig, resume: bool = False) -> dict:
    """Runs (or resumes) the whole loop; returns the metrics also written to run_dir/metrics.json."""
    return run_with_store(config, _setup, _loop, resume)


def _loop(r: _Run, policy) -> None:
    c = r.config
    eos = r.tokenizer.eos_token_id
    policy_data = lambda traces: sft_batch(traces, c.policy_train.max_len, r.pad_id, eos)
    value_data = lambda traces: value_batch(traces, c.prm_train.max_len, r.pad_id, lm_mask=c.prm_lm_weight > 0)
    prm_objective = value_objective(c.prm_loss, c.prm_lm_weight)

    if c.sft is not None:  # a weak but non-zero start: SFT on a few gold solutions
        gold = gold_traces(r.task, r.tokenizer, *r.slice("gold"), chat=c.chat)
        r.train_model("sft", policy, sft_objective, gold, c.sft, lambda t: sft_batch(t, c.sft.max_len, r.pad_id, eos))
    base = snapshot(policy)
    prm = value_model_from(policy, c.seed, likelihood=c.prm_likelihood, lora=c.prm_lora)  # from policy_0's
    verifier = ValueVerifier(prm, aggregation=c.prm_aggregation) if c.guide == "prm" else TaskCheckVerifier(
        r.task, r.tokenizer, [*r.pool, *r.test], noise=c.task_check_noise, seed=c.seed)
    r.stages.run("warmup_data", lambda: _warmup_data(r, policy))
    train_prm = lambda name, traces: r.train_model(name, prm, prm_objective, traces, c.prm_train, value_data,
                                                   trainable=value_parameters(c.prm_train_backbone, bool(c.prm_lora)))
    train_prm("prm_0", r.traces([0], FLAG_ROLLOUT))
    r.stages.run("eval_0", lambda: {"rest_mcts": _evaluate(r, policy, verifier), "rest_em": None})
    _export(r, 0, policy, prm)
    write_report(r.run_dir, to_dict(c), r.stages.results)

    em_policy = copy_of(policy, base)
    for t in range(1, c.iterations + 1):
        since = 1 if c.accumulate else t
        search = r.stages.run(f"search_{t}", lambda: _search(r, policy, verifier, t))
        train_prm(f"prm_{t}", r.traces([0], FLAG_ROLLOUT) + r.traces(range(1, t + 1), FLAG_SEARCH))
        correct = _above_threshold(r, verifier,
                                   unique_traces(r.traces(range(since, t + 1), FLAG_SEARCH | FLAG_CORRECT)))
        if c.policy_from_base:
            policy = copy_of(policy, base)
        r.train_model(f"policy_{t}", policy, sft_objective, correct, c.policy_train, policy_data)

        if c.rest_em.enabled:  # the same budget of generated tokens, spent on plain samples
            r.stages.run(f"rest_em_sample_{t}", lambda: _rest_em_sample(r, em_policy, t, search["generated_tokens"]))
            if c.policy_from_base:
                em_policy = copy_of(em_policy, base)
            r.train_model(f"rest_em_policy_{t}", em_policy, sft_objective,
                          unique_traces(r.traces(range(since, t + 1), FLAG_BASELINE | FLAG_CORRECT)), c.policy_train,
                          policy_data)
        r.stages.run(f"eval_{t}", lambda: {
            "rest_mcts": _evaluate(r, policy, verifier),
            "rest_em": _evaluate(r, em_policy, None) if c.rest_em.enabled else None})
        _export(r, t, policy, prm)
        write_report(r.run_dir, to_dict(c), r.stages.results)


# ---------------------------------------------------------------- stages


def _warmup_data(r: _Run, policy) -> dict:
    """Rollout-labelled prefixes of the warm-up problems (iteration 0 in the store)."""
    w = r.config.warmup
    problems, ids = r.slice("warmup")
    traces, generated = rollout_value_traces(
        policy, r.tokenizer, r.task, problems, ids, num_rollouts=w.num_rollouts, key=r.key_for("warmup"),
        sampling=w.sampling, max_steps=w.max_steps, chat=r.config.chat, rollout_traces=w.rollout_traces,
        mesh=r.mesh)
    r.append_once("warmup_data", traces, 0, FLAG_ROLLOUT)
    targets = np.concatenate([t.step_values for t in traces]) if traces else np.zeros(0)
    targets = targets[~np.isnan(targets)]
    return {"traces": len(traces), "targets": len(targets), "generated_tokens": generated,
            "mean_target": float(targets.mean()) if len(targets) else None}


def _search(r: _Run, policy, verifier: Verifier, t: int) -> dict:
    """MCTS* over the training problems; value samples from every tree with a correct leaf go to the store."""
    problems, ids = r.slice("train")
    result, trees = search_trees(problems, policy=policy, verifier=verifier, tokenizer=r.tokenizer, task=r.task,
                                 config=r.config.search, key=r.key_for(f"search_{t}"), chat=r.config.chat,
                                 mesh=r.mesh)
    samples: list[Trace] = []
    finished_only = r.config.value_targets == "finished_paths"
    for problem, pid, tree in zip(problems, ids, trees):
        samples += tree_value_traces(tree, lambda path, p=problem: r.task.is_correct(p, path.text), pid, t,
                                     finished_only=finished_only)
    r.append_once(f"search_{t}", samples, t, FLAG_SEARCH)
    return {"generated_tokens": result.total_tokens, "verifier_tokens": result.total_verifier_tokens,
            "train_accuracy": result.accuracy, "trees_with_correct_leaf": len({s.problem_id for s in samples}),
            "value_traces": len(samples), "correct_traces": sum(bool(s.flags & FLAG_CORRECT) for s in samples),
            "seconds": round(result.seconds, 1)}


def _rest_em_sample(r: _Run, policy, t: int, token_budget: int) -> dict:
    e = r.config.rest_em
    problems, ids = r.slice("train")
    traces, generated = sample_solutions(
        policy, r.tokenizer, r.task, problems, ids, token_budget=token_budget, samples_per_round=e.samples_per_round,
        sampling=e.sampling, key=r.key_for(f"rest_em_{t}"), iteration=t, chat=r.config.chat, mesh=r.mesh)
    r.append_once(f"rest_em_sample_{t}", traces, t, FLAG_BASELINE)
    solved = {tr.problem_id for tr in traces if tr.flags & FLAG_CORRECT}
    return {"generated_tokens": generated, "samples": len(traces), "train_accuracy": len(solved) / len(problems)}


def _evaluate(r: _Run, policy, verifier: Verifier | None) -> dict:
    """{method: {accuracy, problems, tokens_per_problem, verifier_tokens_per_problem, seconds}} on the held-out
    problems (the first `evaluation.num_problems[method]` of them where set), the same keys and problems every
    iteration, and {"verification": ...} (`_verification`). Without a verifier (ReST-EM's policy) only the methods
    that need none run."""
    ev = r.config.evaluation
    budget = Budget(baseline=ev.baseline, mcts=ev.mcts or r.config.search)
    out = {}
    for method in ev.methods:
        if verifier is None and needs_verifier(method):
            continue
        problems = r.test[:ev.num_problems.get(method, len(r.test))]
        result = run(method, problems, policy=policy, verifier=verifier, tokenizer=r.tokenizer, task=r.task,
                     budget=budget, key=r.key_for(f"eval_{method}"), chat=r.config.chat, mesh=r.mesh)
        out[method] = {"accuracy": result.accuracy, "problems": len(problems),
                       "tokens_per_problem": result.total_tokens / len(problems),
                       "verifier_tokens_per_problem": result.total_verifier_tokens / len(problems),
                       "seconds": round(result.seconds, 1)}
        log.info("eval %s: accuracy %.3f", method, result.accuracy)
    out["verification"] = _verification(r, policy, verifier)
    return out


def _verification(r: _Run, policy, verifier: Verifier | None) -> dict:
    """N held-out samples per problem and what selecting among them gives (`VerificationConfig`)."""
    ev, v = r.config.evaluation, r.config.evaluation.verification
    return evaluate_verifier(policy, verifier, r.tokenizer, r.task,
                             r.test[:ev.num_problems.get("verification", len(r.test))], sampling=ev.baseline.sampling,
                             num_samples=v.num_samples, sizes=v.sizes, key=r.key_for("eval_verification"),
                             chat=r.config.chat, first_error_threshold=v.first_error_threshold, mesh=r.mesh)


def _export(r: _Run, t: int, policy, prm: ValueModel) -> None:
    """Iteration t's policy and PRM as Hugging Face folders, `models/policy_<t>` and `models/prm_<t>`
    (`export_models`: an existing folder was written by an earlier run of the same iteration and stays), and the
    folders of iterations older than `keep_models` removed."""
    export_models(r.run_dir, r.tokenizer, {f"policy_{t}": policy}, {f"prm_{t}": prm})
    keep = r.config.keep_models
    if is_main_process():
        for name in ("policy", "prm"):
            for old in range(t - keep + 1 if keep else 0):
                shutil.rmtree(r.run_dir / "models" / f"{name}_{old}", ignore_errors=True)


# ---------------------------------------------------------------- helpers


def _above_threshold(r: _Run, verifier: Verifier, traces: list[Trace]) -> list[Trace]:
    """The traces whose whole solution the PRM scores >= `prm_threshold` (all of them when it is unset)."""
    if r.config.prm_threshold is None or not traces:
        return traces
    scored = score_solutions(verifier, [t.tokens[:t.prompt_len] for t in traces],
                             [t.tokens[t.prompt_len:] for t in traces],
                             StepSplitter(r.tokenizer, r.task.step_delimiter), pad_id=r.pad_id, mesh=r.mesh)
    return [t for t, s in zip(traces, scored.scores) if s >= r.config.prm_threshold]


def _setup(config: RestMCTSConfig, tokenizer, resume: bool) -> _Run:
    p = config.problems
    return _Run.open(config, tokenizer, resume, p.gold + p.warmup + p.train,
                     "problems.gold + problems.warmup + problems.train")


# ---------------------------------------------------------------- `algorithm: rest_mcts` for `jaxreason train`


def _summary(config: RestMCTSConfig, metrics: dict) -> str:
    last = metrics["iterations"][-1]
    accuracy = ", ".join(f"{m} {row['accuracy']:.3f}" for m, row in last["rest_mcts"].items() if "accuracy" in row)
    return (f"rest_mcts: iteration {last['iteration']} held-out accuracy: {accuracy}\n"
            f"report: {config.run_dir}/report.md")


register_algorithm("rest_mcts", RestMCTSConfig, run_rest_mcts, summarize=_summary)
