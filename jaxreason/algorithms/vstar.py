"""V-STaR (Hosseini et al., 2024, arXiv 2402.06457): self-taught reasoning that keeps its wrong solutions to train a
DPO verifier. Algorithm 1 of the paper:

    D_GEN <- D_SFT (gold solutions);  G_SFT <- SFT(G_base, D_SFT)                 stage "sft"
    for t = 1 .. T:
        S     <- k samples per training problem from G_{t-1}  (G_0 = G_SFT)       stage "sample_t"
        D_GEN <- D_GEN + the correct ones of S;  D_VER <- D_VER + all of S, labelled by the task's checker
        G_t   <- SFT(G_base, D_GEN)  (`generator_init`: base | sft | previous)    stage "generator_t"
    V <- DPO(G_SFT, (correct, incorrect) pairs of the same problem from D_VER)      stage "verifier"
    test time: the best of k samples of G_T by V's score, beta (log pi_V - log pi_SFT)

Baselines in the same run: STaR (`star_t`: SFT on D_SFT and the correct samples of its own latest iteration only,
drawn from STaR_{t-1}), an outcome reward model trained on D_VER (`orm`), and majority vote; every generator is
evaluated on held-out problems after each iteration (greedy and `evaluation.num_samples` samples kept in the trace
store), and at the end V and the ORM score every iteration's held-out samples for the Best-of-k table
(`jaxreason.verifiers.best_of_k`). Rationalization (STaR's retry with the gold answer as a hint, for problems none
of whose samples is correct) adds to D_GEN when `rationalization` is set.

Every stage's result lands in `run_dir/stages.json`, samples in the tensorstore trace store `run_dir/traces`,
model states in orbax checkpoints under `run_dir/<stage>/`; `--resume` continues from the last finished stage.
A multi-process job runs the same loop on every process, on one shared run folder that process 0 alone writes
(`StoreRun`).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import (
    copy_of,
    dpo_verifier_from,
    lm_parameters,
    snapshot,
    value_model_from,
    value_parameters,
)
from jaxreason.algorithms.preference_pairs import pair_batch, preference_pairs, with_reference
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.stages import export_models
from jaxreason.algorithms.store_run import StoreRun, run_with_store
from jaxreason.algorithms.vstar_report import write_vstar_report
from jaxreason.config import to_dict
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import (
    FLAG_BASELINE,
    FLAG_CORRECT,
    FLAG_EVAL,
    FLAG_HINTED,
    Trace,
    unique_traces,
)
from jaxreason.distributed import is_main_process
from jaxreason.models.spec import ModelSpec
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import prompt_ids
from jaxreason.search.baselines import draw_solutions
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.search.votes import group_answers
from jaxreason.tasks.base import Problem, TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.metrics import progress
from jaxreason.train.objectives import dpo_objective, sft_objective, value_objective
from jaxreason.train.sft import LoRAConfig
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.best_of_k import best_of_k_curves
from jaxreason.verifiers.dpo import DPOVerifier
from jaxreason.verifiers.metrics import roc_auc, within_problem_auc
from jaxreason.verifiers.positions import StepSplitter
from jaxreason.verifiers.value import ValueVerifier

log = logging.getLogger(__name__)

# Which samples a stage wrote, as (flags all set, flags all clear) in the trace store; rationalizations (hinted)
# are "vstar" or "star" samples too, but train generators only.
_KINDS = {"vstar": (0, FLAG_BASELINE | FLAG_EVAL), "star": (FLAG_BASELINE, FLAG_EVAL),
          "vstar_eval": (FLAG_EVAL, FLAG_BASELINE), "star_eval": (FLAG_EVAL | FLAG_BASELINE, 0)}


@dataclasses.dataclass(frozen=True)
class VStarProblems:
    """The task's train split: the first `gold` problems are D_SFT (ReST-MCTS*'s gold slice with the same seed),
    the next `train` the training queries; and `test` held-out problems. With `queries_are_gold` the queries are
    the gold problems themselves (the paper's setting: D_SFT's questions; their gold solutions join D_VER as
    correct ones) and `train` is not read."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    train: int = 256
    test: int = 128
    queries_are_gold: bool = False

    @property
    def pool_size(self) -> int:
        return self.gold if self.queries_are_gold else self.gold + self.train


@dataclasses.dataclass(frozen=True)
class VerifierTraining:
    """The DPO verifier: trained once, from G_SFT, on up to `pairs_per_problem` pairs per problem of D_VER."""

    train: FitConfig = FitConfig()
    beta: float = 0.1
    label_smoothing: float = 0.0
    pairs_per_problem: int = 8
    # adapters on G_SFT, the only weights trained; the reference is G_SFT with them off (no second copy)
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.beta <= 0 or self.pairs_per_problem < 1:
            raise ValueError(f"verifier: beta must be > 0 and pairs_per_problem >= 1, got {self.beta}, "
                             f"{self.pairs_per_problem}")


@dataclasses.dataclass(frozen=True)
class VStarEval:
    """Held-out evaluation of every generator after each iteration: greedy on all `problems.test` (decoding with
    `greedy.sampling.max_new_tokens`), and `num_samples` samples per problem (`sampling`), from which Best-of-k,
    majority vote and pass@k at k = 1 .. num_samples."""

    num_samples: int = 16
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    greedy: BaselineConfig = BaselineConfig()
    # the verifiers score the last generator's samples (the claim); every iteration's with this set
    verify_every_iteration: bool = False


@dataclasses.dataclass(frozen=True)
class VStarConfig:
    policy: ModelSpec
    problems: VStarProblems = VStarProblems()
    run_dir: str = "runs/vstar"
    seed: int = 0
    chat: bool = False  # wrap every prompt in the tokenizer's chat template (instruct models)
    iterations: int = 3  # T
    samples_per_problem: int = 16  # k
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    sample_batch: int = 64  # training problems per sampling call (memory)
    sft: FitConfig | None = FitConfig()  # G_SFT; null: the base model is G_SFT (an instruct model, no gold SFT)
    generator_train: FitConfig = FitConfig()
    # Where G_t starts: "base" (the paper: the model before SFT), "sft" (G_SFT) or "previous" (G_{t-1})
    generator_init: str = "base"
    rationalization: bool = False  # STaR's gold-hinted retry for problems with no correct sample
    rationalization_hint: str = " (The answer is {answer}.)"  # appended to the question
    star: bool = True  # the STaR baseline: its own chain of generators
    verifier: VerifierTraining = VerifierTraining()
    orm: FitConfig | None = FitConfig()  # the outcome reward model baseline; null: none
    orm_lora: LoRAConfig | None = None  # adapters on the ORM's backbone, trained with its head (null: all weights)
    evaluation: VStarEval = VStarEval()
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.iterations < 1 or self.samples_per_problem < 1 or self.sample_batch < 1:
            raise ValueError("iterations, samples_per_problem and sample_batch must be >= 1")
        if self.generator_init not in ("base", "sft", "previous"):
            raise ValueError(f"generator_init must be 'base', 'sft' or 'previous', got {self.generator_init!r}")
        if self.evaluation.num_samples < 1:
            raise ValueError(f"evaluation.num_samples must be >= 1, got {self.evaluation.num_samples}")
        if "{answer}" not in self.rationalization_hint:
            raise ValueError("rationalization_hint must contain {answer}")


class _Run(StoreRun):
    """V-STaR's run (`StoreRun`): its training pool is the gold problems, then the training queries (none with
    `queries_are_gold`); held-out problems are numbered after the pool."""

    @property
    def queries(self) -> tuple[list[Problem], list[int]]:
        p = self.config.problems
        start = 0 if p.queries_are_gold else p.gold
        return self.pool[start:], list(range(start, len(self.pool)))

    def samples(self, kind: str, iterations, correct_only: bool = False) -> list[Trace]:
        """Committed samples of that kind (`_KINDS`) and those iterations, in the order they were written."""
        flags_all, flags_none = _KINDS[kind]
        rows = [self.store.select(iteration=i, flags_all=flags_all | (FLAG_CORRECT if correct_only else 0),
                                  flags_none=flags_none) for i in iterations]
        return self.store.read(np.concatenate(rows)) if rows else []

    def append_once(self, kind: str, traces: list[Trace], iteration: int) -> None:
        """Appends a stage's samples unless an earlier run already committed them (killed before logging)."""
        if self.samples(kind, [iteration]):
            log.info("%s samples of iteration %d already in the store", kind, iteration)
        elif traces:
            self.append(traces)


def run_vstar(config: VStarConfig, resume: bool = False) -> dict:
    """Runs (or resumes) V-STaR; returns the metrics also written to run_dir/metrics.json."""
    return run_with_store(config, _setup, _loop, resume)


def _loop(r: _Run, policy) -> None:
    c = r.config
    eos = r.tokenizer.eos_token_id
    sft_data = lambda traces: sft_batch(traces, c.generator_train.max_len, r.pad_id, eos)
    gold = gold_traces(r.task, r.tokenizer, r.pool[:c.problems.gold], range(c.problems.gold), chat=c.chat) \
        if c.problems.gold else []

    base = snapshot(policy)
    if c.sft is not None:
        r.train_model("sft", policy, sft_objective, gold, c.sft, lambda t: sft_batch(t, c.sft.max_len, r.pad_id, eos))
    g_sft = snapshot(policy)
    start = {"base": base, "sft": g_sft}
    r.stages.run("eval_0", lambda: {"vstar": _evaluate(r, policy, "vstar_eval", 0), "star": None})
    generator, star = policy, copy_of(policy, g_sft)
    for t in range(1, c.iterations + 1):
        r.stages.run(f"sample_{t}", lambda: _sample(r, generator, "vstar", t))
        d_gen = gold + unique_traces(r.samples("vstar", range(1, t + 1), correct_only=True))
        if c.generator_init != "previous":
            generator = copy_of(generator, start[c.generator_init])
        r.train_model(f"generator_{t}", generator, sft_objective, d_gen, c.generator_train, sft_data)
        if c.star:  # STaR_0 = G_SFT = G_0: its first samples are V-STaR's
            kind = "vstar" if t == 1 else "star"
            if t > 1:
                r.stages.run(f"star_sample_{t}", lambda: _sample(r, star, "star", t))
            if c.generator_init != "previous":
                star = copy_of(star, start[c.generator_init])
            star_data = gold + unique_traces(r.samples(kind, [t], correct_only=True))
            r.train_model(f"star_{t}", star, sft_objective, star_data, c.generator_train, sft_data)
        r.stages.run(f"eval_{t}", lambda: {"vstar": _evaluate(r, generator, "vstar_eval", t),
                                           "star": _evaluate(r, star, "star_eval", t) if c.star else None})

    # gold solutions end as the samples do, with EOS (else its absence alone would mark a correct solution)
    gold_ver = [dataclasses.replace(t, tokens=np.append(t.tokens, np.int32(eos)).astype(np.int32)) for t in gold]
    d_ver = (gold_ver if c.problems.queries_are_gold else []) + [
        s for s in r.samples("vstar", range(1, c.iterations + 1)) if not s.flags & FLAG_HINTED]
    verifier = dpo_verifier_from(policy, g_sft, c.verifier.beta, c.seed, c.verifier.lora)  # pi_V, pi_ref: G_SFT
    _train_verifier(r, verifier, d_ver)
    orm = None
    if c.orm is not None:
        orm = value_model_from(policy, c.seed, g_sft, lora=c.orm_lora)  # its own backbone, from G_SFT's
        labelled = [dataclasses.replace(t, step_ends=np.asarray([len(t.tokens)], np.int32),
                                        step_values=np.asarray([t.reward], np.float32)) for t in d_ver]
        r.train_model("orm", orm, value_objective("bce"), labelled, c.orm,
                      lambda traces: value_batch(traces, c.orm.max_len, r.pad_id),
                      trainable=value_parameters(lora=c.orm_lora is not None))
    verifiers = {"verifier": verifier} | ({"orm": ValueVerifier(orm)} if orm is not None else {})
    r.stages.run("best_of_k", lambda: _best_of_k(r, verifiers))
    models = {"generator": generator, "star": star if c.star else None, "verifier": verifier.model,
              "verifier_reference": verifier.reference or copy_of(policy, g_sft)}
    export_models(r.run_dir, r.tokenizer, models, {"orm": orm})
    if is_main_process():  # the others read metrics.json back (`run_with_store`)
        write_vstar_report(r.run_dir, to_dict(c), r.stages.results)


# ---------------------------------------------------------------- stages


def _sample(r: _Run, policy, kind: str, t: int) -> dict:
    """k samples of each training query from `policy`, labelled by the task's checker, into the store; with
    `rationalization`, a gold-hinted retry of the problems none of whose samples is correct (added to D_GEN
    only: flagged FLAG_HINTED, stored with the unhinted prompt)."""
    c = r.config
    problems, ids = r.queries
    traces, generated = _draw(r, policy, problems, ids, c.samples_per_problem, c.sampling, r.key_for(f"{kind}_{t}"),
                              t, FLAG_BASELINE if kind == "star" else 0, f"{kind} samples {t}")
    correct = np.asarray([bool(tr.flags & FLAG_CORRECT) for tr in traces]).reshape(len(problems), -1)
    out = {"samples": len(traces), "generated_tokens": generated, "accuracy": float(correct.mean()),
           "solved": float(correct.any(axis=1).mean())}
    if c.rationalization:
        unsolved = [i for i in range(len(problems)) if not correct[i].any()]
        retried, _ = _draw(r, policy, [problems[i] for i in unsolved], [ids[i] for i in unsolved], 1, c.sampling,
                           r.key_for(f"{kind}_hint_{t}"), t, FLAG_HINTED | (FLAG_BASELINE if kind == "star" else 0),
                           f"{kind} rationalization {t}", hint=c.rationalization_hint)
        traces += [tr for tr in retried if tr.flags & FLAG_CORRECT]
        out["rationalized"] = len(traces) - out["samples"]
    r.append_once(kind, traces, t)
    return out


def _draw(r: _Run, policy, problems: list[Problem], ids: list[int], k: int, sampling: SamplingConfig, key,
          t: int, flags: int, description: str, hint: str | None = None) -> tuple[list[Trace], int]:
    """k samples per problem (problem-major), as traces of the unhinted prompt; and the tokens generated."""
    c = r.config
    prompts = [prompt_ids(r.tokenizer, r.task.prompt(p), chat=c.chat) for p in problems]
    asked = prompts if hint is None else [prompt_ids(r.tokenizer, r.task.prompt(
        dataclasses.replace(p, question=p.question + hint.format(answer=p.answer))), chat=c.chat) for p in problems]
    traces, generated = [], 0
    with progress(len(problems), description=description) as bar:
        for start in range(0, len(problems), c.sample_batch):
            rows = range(start, min(start + c.sample_batch, len(problems)))
            chunk = [asked[i] for i in rows] + [asked[rows[-1]]] * (c.sample_batch - len(rows))  # one shape
            drawn = draw_solutions(policy, r.tokenizer, chunk, sampling, jax.random.fold_in(key, start), k, r.mesh)
            for i, samples in zip(rows, drawn):
                for s in samples:
                    generated += len(s)
                    ok = r.task.is_correct(problems[i], r.tokenizer.decode(s.tolist(), skip_special_tokens=True))
                    traces.append(Trace(problem_id=ids[i], iteration=t,
                                        tokens=np.concatenate([np.asarray(prompts[i], np.int32), s]).astype(np.int32),
                                        prompt_len=len(prompts[i]), step_ends=np.zeros(0, np.int32),
                                        step_values=np.zeros(0, np.float32), reward=float(ok),
                                        flags=flags | (FLAG_CORRECT if ok else 0)))
            bar.update(len(rows))
    return traces, generated


def _evaluate(r: _Run, policy, kind: str, t: int) -> dict:
    """Greedy accuracy on the held-out problems, and `evaluation.num_samples` samples of each kept in the store:
    their mean accuracy (pass@1), majority vote and pass@N."""
    ev = r.config.evaluation
    greedy = run_method("greedy", r.test, policy=policy, tokenizer=r.tokenizer, task=r.task,
                        budget=Budget(baseline=ev.greedy), key=r.key_for("greedy"), chat=r.config.chat, mesh=r.mesh)
    offset = len(r.pool)
    samples = r.samples(kind, [t])
    if not samples:
        samples, _ = _draw(r, policy, r.test, list(range(offset, offset + len(r.test))), ev.num_samples, ev.sampling,
                           r.key_for(f"eval_{t}"), t, _KINDS[kind][0], f"{kind} {t}")
        r.append_once(kind, samples, t)
    correct, groups = _outcomes(r, samples)
    n = ev.num_samples
    curves = best_of_k_curves(correct, groups, {}, [1, n])
    log.info("%s %d: greedy %.3f, pass@1 %.3f, majority@%d %.3f", kind, t, greedy.accuracy, curves["pass"][1], n,
             curves["majority"][n])
    return {"greedy": greedy.accuracy, "pass@1": curves["pass"][1], f"majority@{n}": curves["majority"][n],
            f"pass@{n}": curves["pass"][n], "tokens_per_sample": float(np.mean([len(s.tokens) - s.prompt_len
                                                                                 for s in samples]))}


def _train_verifier(r: _Run, verifier: DPOVerifier, d_ver: list[Trace]) -> None:
    """DPO of the verifier from G_SFT on pairs of D_VER (the reference's log-probs computed once, up front)."""
    v = r.config.verifier
    pairs, counts = preference_pairs(d_ver, v.pairs_per_problem, r.config.seed)
    log.info("verifier pairs: %s", counts)
    if "verifier_pairs" not in r.stages:
        r.stages.run("verifier_pairs", lambda: counts)
    if "verifier" not in r.stages:  # a finished stage restores its checkpoint and trains no step
        pairs = with_reference(pairs, verifier.reference_model, v.train.max_len, r.pad_id)
    r.train_model("verifier", verifier.model, dpo_objective(v.beta, v.label_smoothing), pairs, v.train,
                  lambda batch: pair_batch(batch, v.train.max_len, r.pad_id),
                  trainable=lm_parameters(v.lora is not None))


def _best_of_k(r: _Run, verifiers: dict[str, Verifier]) -> dict:
    """Every verifier's scores of the held-out samples of V-STaR's last generator (of every iteration's with
    `evaluation.verify_every_iteration`), and from them Best-of-k, majority vote and pass@k (at every k = 1 .. N for
    the last iteration, at k = 1 and N before), and each verifier's AUC; for the last STaR generator's samples,
    majority and pass@k at every k."""
    ev, last = r.config.evaluation, r.config.iterations
    n = ev.num_samples
    out = {}
    for t in range(last + 1) if ev.verify_every_iteration else [last]:
        samples = r.samples("vstar_eval", [t])
        correct, groups = _outcomes(r, samples)
        scores = {}
        for name, verifier in verifiers.items():
            scored = score_solutions(verifier, [s.tokens[:s.prompt_len] for s in samples],
                                     [s.tokens[s.prompt_len:] for s in samples],
                                     StepSplitter(r.tokenizer, r.task.step_delimiter), pad_id=r.pad_id,
                                     width_multiple=16, mesh=r.mesh)  # lengths barely vary: little padding
            scores[name] = scored.scores.reshape(correct.shape)
        ks = list(range(1, n + 1)) if t == last else [1, n]  # the table reads k = N; the plot all
        row = {"curves": _as_lists(best_of_k_curves(correct, groups, scores, ks)),
               "auc": {name: roc_auc(s.ravel(), correct.ravel()) for name, s in scores.items()},
               "auc_within_problems": {name: within_problem_auc(s, correct) for name, s in scores.items()}}
        if t == last and r.config.star:
            star_correct, star_groups = _outcomes(r, r.samples("star_eval", [t]))
            row["star_curves"] = _as_lists(best_of_k_curves(star_correct, star_groups, {}, list(range(1, n + 1))))
        out[str(t)] = row
    return out


# ---------------------------------------------------------------- helpers


def _outcomes(r: _Run, samples: list[Trace]) -> tuple[np.ndarray, np.ndarray]:
    """[P, N] correctness and answer groups of samples written problem-major, N per problem."""
    n = r.config.evaluation.num_samples
    texts = [r.tokenizer.decode(s.tokens[s.prompt_len:].tolist(), skip_special_tokens=True) for s in samples]
    correct = np.asarray([bool(s.flags & FLAG_CORRECT) for s in samples]).reshape(-1, n)
    groups = np.stack([group_answers([r.task.extract_answer(x) for x in texts[i:i + n]])
                       for i in range(0, len(texts), n)])
    return correct, groups


def _as_lists(curves: dict[str, dict[int, float]]) -> dict[str, list]:
    """{"k": [k...], curve: [accuracy at each k]}: the stage log's JSON keeps no integer keys."""
    ks = sorted(next(iter(curves.values())))
    return {"k": ks} | {name: [curve[k] for k in ks] for name, curve in curves.items()}


def _setup(config: VStarConfig, tokenizer, resume: bool) -> _Run:
    p = config.problems
    return _Run.open(config, tokenizer, resume, p.pool_size,
                     "problems.gold" + ("" if p.queries_are_gold else " + problems.train"))


# ---------------------------------------------------------------- `algorithm: vstar` for `jaxreason train`


def _summary(config: VStarConfig, metrics: dict) -> str:
    final = metrics["best_of_k"]
    n = final["k"][-1]
    shown = ", ".join(f"{name} {final[name][-1]:.3f}" for name in ("verifier", "orm", "majority", "pass")
                      if name in final)
    return f"vstar: held-out Best-of-{n}: {shown}\nreport: {config.run_dir}/report.md"


register_algorithm("vstar", VStarConfig, run_vstar, summarize=_summary)
