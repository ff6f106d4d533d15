"""RL on incorrect synthetic data with per-step advantages against positive-only SFT (Setlur et al., 2024, "RL on
incorrect synthetic data scales the efficiency of LLM math reasoning by eight-fold", arXiv 2406.14532):

    policy_0 <- SFT(base, gold solutions)                             stage "sft" (as ReST-MCTS*'s and GRPO's)
    D        <- k samples of policy_0 for each of the `train` next training problems, checked      stage "sample"
    Q_i      <- Monte Carlo success of each step prefix of each distinct sample: the fraction of M continuations
                of policy_0 from the prompt and its first i steps that the checker accepts (Q_S: its own reward);
                identical prefixes of one problem pool their estimates (`pooled_prefix_values`)    stage "values"
    for n in sizes (the first n problems of D, nested):
        RFT_n     <- SFT(policy_0, the distinct correct samples of the n problems)                  stage "rft_n"
        StepRL_n  <- offline RL from RFT_n (`rl_start`; or from policy_0) on all distinct samples of the n
                     problems (correct and incorrect), each weighted by how often it was drawn: token t of step i
                     weighted by A_i = Q_i - Q_{i-1}, KL to its start                              stage "step_rl_n"
        greedy accuracy of both on the held-out problems                  stages "eval_rft_n", "eval_step_rl_n"
    data-efficiency ratio: the data RFT needs for each StepRL accuracy (`step_rl_report.data_efficiency`)

The equal-data rule: both methods read the samples of the same n problems, deduplicated per problem, and make
the same number of passes (`rft.epochs`) in batches of `rft.batch_size` rows over their own rows, capped at
`rft.num_steps` updates; with `rft.epochs` null both take `rft.num_steps` updates. RFT's rows are the correct
samples, StepRL's every sample (the negatives are the point), so StepRL makes more updates at equal passes; it
also reads the M continuations per step that estimated Q, drawn from policy_0 (reported as rollout tokens).
StepRL weighs each distinct sample by its count (mean weight 1): deduplicated without it, a right solution drawn
three times would weigh as one against each distinct wrong one, and the tokens they share (a right first step
before a wrong one) would be pushed down, where the policy gradient over the samples as drawn leaves them be.

The update is `PolicyTrainer`'s, on the fixed rows: each batch is one on-policy step (ratio 1), so its loss is
-A_t log pi(token t) + kl_coef KL(pi || policy_0) per trained token: advantage-weighted likelihood, which raises a
step that raised the success estimate and lowers one that lowered it. A negative's first pit (`first_pit`: the
first step after which the estimated success falls to about 0) is the step its advantages weigh most negatively.

Samples and values land in `run_dir/synthetic/` (JSON), each stage's result in `stages.json`, model states in
orbax checkpoints under `run_dir/<stage>/`; `--resume` continues from the last finished stage (an RL stage from
its last checkpoint). A multi-process job runs every stage on every process; process 0 alone writes the run folder
and the others read the synthetic data back from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import copy_of, snapshot
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rl_steps import StepHistory, finish_rl_run, restore_rl_state, run_rl_steps
from jaxreason.algorithms.stages import StageLog, export_models, open_run_dir
from jaxreason.algorithms.step_rl_report import write_step_rl_report
from jaxreason.config import to_dict
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch
from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.distributed import is_main_process, sync
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.rl.advantages import per_token, step_advantages
from jaxreason.rl.offline_episodes import offline_episodes
from jaxreason.rl.prefix_values import PrefixValues, prefix_values, step_index
from jaxreason.rl.rewards import task_reward
from jaxreason.rl.rollouts import Episodes
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.tasks.base import Problem, Task, TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective
from jaxreason.verifiers.positions import StepSplitter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepRLProblems:
    """The task's train split: the first `gold` problems for policy_0's SFT (ReST-MCTS*'s gold slice with the
    same seed), the next `train` the synthetic pool (sizes read its first n); and `test` held-out problems."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    train: int = 512
    test: int = 128


@dataclasses.dataclass(frozen=True)
class PrefixValueConfig:
    """Q of each step prefix from `num_rollouts` (M) continuations of policy_0 drawn with `sampling`; a negative's
    first pit is the first step whose Q is at most `pit_threshold` after one above it."""

    num_rollouts: int = 4
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    max_steps: int | None = None  # steps past this join the last one (`StepSplitter`)
    pit_threshold: float = 0.05  # below 1 / M: "exactly 0 of M continuations succeed"

    def __post_init__(self):
        if self.num_rollouts < 1:
            raise ValueError(f"values.num_rollouts must be >= 1, got {self.num_rollouts}")
        if not 0 <= self.pit_threshold < 1:
            raise ValueError(f"values.pit_threshold must be in [0, 1), got {self.pit_threshold}")


@dataclasses.dataclass(frozen=True)
class StepRLConfig:
    policy: ModelSpec
    problems: StepRLProblems = StepRLProblems()
    run_dir: str = "runs/step_rl"
    seed: int = 0
    chat: bool = False
    sft: FitConfig | None = FitConfig()  # policy_0 from the base model; null: the base model is policy_0
    sizes: tuple[int, ...] = (64, 128, 256, 512)  # synthetic problems used, increasing, the last <= problems.train
    samples_per_problem: int = 4  # k
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    values: PrefixValueConfig = PrefixValueConfig()
    # RFT's SFT; its epochs, batch_size and num_steps (a cap) also set StepRL's passes (the equal-data rule)
    rft: FitConfig = FitConfig(epochs=3.0, num_steps=100_000)
    update: PolicyGradientConfig = PolicyGradientConfig()  # StepRL's update: kl_coef, optimizer, aggregation
    # where StepRL starts (and its KL reference): "rft", RFT_n (the paper: SFT on the positives, then per-step RL
    # on positives and negatives), or "policy_0" (RL alone, against RFT alone)
    rl_start: str = "rft"
    evaluation: BaselineConfig = BaselineConfig()  # greedy decoding reads sampling.max_new_tokens
    checkpoint_every: int = 50  # StepRL updates between checkpoints
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        sizes = list(self.sizes)
        if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"sizes must be increasing positive problem counts, got {self.sizes}")
        if sizes[-1] > self.problems.train:
            raise ValueError(f"sizes reach {sizes[-1]} problems but the synthetic pool (problems.train) holds "
                             f"{self.problems.train}")
        if self.rl_start not in ("rft", "policy_0"):
            raise ValueError(f"rl_start must be 'rft' or 'policy_0', got {self.rl_start!r}")
        if self.samples_per_problem < 1 or self.checkpoint_every < 1:
            raise ValueError("samples_per_problem and checkpoint_every must be >= 1")
        if self.update.minibatch_rows is not None and self.rft.batch_size % self.update.minibatch_rows:
            raise ValueError(f"update.minibatch_rows ({self.update.minibatch_rows}) must divide rft.batch_size "
                             f"({self.rft.batch_size}), the rows of each StepRL batch")

    @property
    def updates_per_batch(self) -> int:
        return self.update.epochs * (self.rft.batch_size // (self.update.minibatch_rows or self.rft.batch_size))


# ---------------------------------------------------------------- pure pieces


def first_pit(values: Sequence[float], threshold: float) -> int | None:
    """The first pit of a solution: the first step i (1-based) whose prefix value values[i] is at most `threshold`
    right after a prefix valued above it (values[i - 1] > threshold); None when there is none.

    values: [S + 1] Q(prefix_0) (the prompt alone) .. Q(prefix_S) (the whole solution: its own reward). A
    negative whose problem policy_0 already fails from the prompt (Q_0 <= threshold) has no pit.
    """
    for i in range(1, len(values)):
        if values[i - 1] > threshold >= values[i]:
            return i
    return None


def pit_statistics(values: Sequence[np.ndarray], correct: Sequence[bool], threshold: float,
                   first_wrong: Sequence[int | None] | None = None) -> dict:
    """What the first pits of the negatives are, and how the per-step advantages A_i = Q_i - Q_{i-1} weigh them.

    values: per solution [S + 1] prefix values; correct: [R]; first_wrong: per solution the task's first wrong step
    (0-based, None when none or unknown), or None for a task without process labels. Returns counts, the fraction
    of negatives with a pit, the mean pit step (1-based) and its mean place in the solution (pit / S), the mean
    advantage at the pits, at the negatives' other steps and at the positives' steps, how often the pit is a
    negative's most negative step, and (with first_wrong) how often it is the first wrong step.
    """
    pits, at_pit, elsewhere, positive_steps, lowest, labelled, at_wrong = [], [], [], [], 0, 0, 0
    negatives = 0
    for r, (v, ok) in enumerate(zip(values, correct)):
        v = np.asarray(v, np.float64)
        advantages = v[1:] - v[:-1]
        if ok:
            positive_steps += advantages.tolist()
            continue
        negatives += 1
        pit = first_pit(v, threshold)
        if pit is None:
            continue
        pits.append((pit, len(advantages)))
        at_pit.append(advantages[pit - 1])
        elsewhere += np.delete(advantages, pit - 1).tolist()
        lowest += bool(advantages[pit - 1] <= advantages.min())
        if first_wrong is not None and first_wrong[r] is not None:
            labelled += 1
            at_wrong += pit - 1 == first_wrong[r]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    return {"negatives": negatives, "positives": len(values) - negatives, "with_pit": len(pits),
            "pit_fraction": len(pits) / negatives if negatives else None,
            "mean_pit_step": mean([p for p, _ in pits]), "mean_pit_place": mean([p / s for p, s in pits]),
            "mean_negative_steps": mean([s for _, s in pits]),
            "advantage_at_pit": mean(at_pit), "advantage_elsewhere_in_negatives": mean(elsewhere),
            "advantage_in_positives": mean(positive_steps),
            "pit_is_most_negative_step": lowest / len(pits) if pits else None,
            "pits_with_first_wrong_step": labelled if first_wrong is not None else None,
            "pit_at_first_wrong_step": (at_wrong / labelled if labelled else None) if first_wrong is not None
            else None}


def pooled_prefix_values(problems: Sequence[int], completions: Sequence[Sequence[int]],
                         values: Sequence[Sequence[float]], step_ends: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each row's prefix values with every proper prefix's estimate replaced by the mean over all rows of the same
    problem whose completions start with the same tokens up to that step (the prompt alone for every row of a
    problem; a first step several samples share): Q is a property of the prefix, and the mean of g estimates of M
    continuations each is an estimate of g M. The last entry, the row's own reward, stays.

    problems: [R] each row's problem; values[r]: [S_r + 1]; step_ends[r]: [S_r] (one past each step's last token).
    """
    keys = [[(p, tuple(c[:end])) for end in [0, *e[:-1]]] for p, c, e in zip(problems, completions, step_ends)]
    estimates: dict = {}
    for row, v in zip(keys, values):
        for key, q in zip(row, v):
            estimates.setdefault(key, []).append(q)
    return [np.asarray([*(np.mean(estimates[key]) for key in row), v[-1]], np.float32) for row, v in zip(keys, values)]


def step_advantage_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        values: Sequence[Sequence[float]], step_ends: Sequence[Sequence[int]], *,
                        pad_id: int) -> tuple[Episodes, np.ndarray]:
    """Sampled solutions as offline episodes [R, T] (one width, the longest row rounded up to 16: one compiled
    update) and their per-token advantages [R, T]: A_i = values[r][i] - values[r][i - 1] on every token of step i
    (step_ends[r]: one past each step's last token, in the completion), 0 off the completions.

    values[r]: [S_r + 1] prefix values of row r (`rl.prefix_values`), step_ends[r]: [S_r]. Entry t of both arrays
    belongs to token tokens[:, t], as the policy-gradient loss reads them.
    """
    longest = max(len(p) + len(s) for p, s in zip(prompts, completions))
    episodes = offline_episodes(prompts, completions, pad_id=pad_id, width=-(-longest // 16) * 16)
    ends = [np.asarray(e, np.int32) for e in step_ends]
    padded, mask = PrefixValues([np.asarray(v, np.float32) for v in values], ends, 0).padded()
    advantages = per_token(step_advantages(padded, mask), step_index(episodes, ends))
    return episodes, np.asarray(advantages)


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class _Run:
    config: StepRLConfig
    run_dir: Path
    stages: StageLog
    task: Task
    tokenizer: object
    mesh: jax.sharding.Mesh
    queries: list[Problem]  # the synthetic pool
    prompts: list[list[int]]  # the pool's prompt ids
    test: list[Problem]
    key: jax.Array
    stop_ids: tuple[int, ...]

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def evaluate(self, model) -> dict:
        """Greedy accuracy on the held-out problems (the decoding of GRPO's and ReST-MCTS*'s evaluations)."""
        result = run_method("greedy", self.test, policy=model, tokenizer=self.tokenizer, task=self.task,
                            budget=Budget(baseline=self.config.evaluation), key=self.key, chat=self.config.chat,
                            mesh=self.mesh)
        log.info("held-out greedy accuracy %.3f", result.accuracy)
        return {"greedy": result.accuracy, "generated_tokens": int(np.sum(result.generated_tokens))}


def run_step_rl(config: StepRLConfig, resume: bool = False) -> dict:
    """Runs (or resumes) the comparison; returns the metrics also written to run_dir/metrics.json."""
    c = config
    policy, tokenizer = build_model(c.policy, c.seed)
    if tokenizer is None:
        raise ValueError(f"{c.policy.pretrained}: no tokenizer beside the weights")
    run_dir = open_run_dir(c.run_dir, to_dict(c), resume)
    task = c.problems.task.build()
    pool = task.problems("train", n=c.problems.gold + c.problems.train, seed=c.seed)
    if len(pool) < c.problems.gold + c.problems.train:
        raise ValueError(f"task {c.problems.task.name}: {len(pool)} training problems, the config needs "
                         f"{c.problems.gold + c.problems.train} (problems.gold + problems.train)")
    queries = pool[c.problems.gold:]
    r = _Run(config=c, run_dir=run_dir, stages=StageLog(run_dir), task=task, tokenizer=tokenizer,
             mesh=sharding.make_mesh(c.mesh), queries=queries,
             prompts=[prompt_ids(tokenizer, task.prompt(p), chat=c.chat) for p in queries],
             test=task.problems("test", n=c.problems.test, seed=c.seed), key=jax.random.key(c.seed),
             stop_ids=eos_ids(tokenizer, policy.config))
    eos = tokenizer.eos_token_id

    if c.sft is not None:
        gold = gold_traces(task, tokenizer, pool[:c.problems.gold], range(c.problems.gold), chat=c.chat)
        r.stages.train("sft", policy, sft_objective, gold, c.sft,
                       lambda t: sft_batch(t, c.sft.max_len, r.pad_id, eos), mesh=r.mesh, seed=c.seed)
    policy_0 = snapshot(policy)  # `policy` stays policy_0: every trained model is a copy
    r.stages.run("eval_policy_0", lambda: r.evaluate(policy))
    samples = _saved_stage(r, "sample", lambda: _sample(r, policy))
    unique, counts = _distinct(samples)
    estimated = _saved_stage(r, "values", lambda: _values(r, policy, samples, unique))
    correct = [bool(samples["correct"][i]) for i in unique]
    completions = [samples["completion"][i] for i in unique]
    owners = [samples["problem"][i] for i in unique]
    values = pooled_prefix_values(owners, completions, estimated["values"], estimated["step_ends"])
    episodes, advantages = step_advantage_rows([r.prompts[p] for p in owners], completions, values,
                                               estimated["step_ends"], pad_id=r.pad_id)
    first_wrong = _first_wrong(r, owners, completions)

    data = []
    models = {}
    for n in c.sizes:
        rows = int(np.searchsorted(owners, n))  # distinct samples of the first n problems (problem-major)
        positives = [i for i in range(rows) if correct[i]]
        models["rft"] = copy_of(policy, policy_0)
        traces = [_trace(r, c.problems.gold, owners[i], completions[i]) for i in positives]
        r.stages.train(f"rft_{n}", models["rft"], sft_objective, traces, c.rft,
                       lambda t: sft_batch(t, c.rft.max_len, r.pad_id, eos), mesh=r.mesh, seed=c.seed)
        r.stages.run(f"eval_rft_{n}", lambda: r.evaluate(models["rft"]))
        # a distinct sample weighs as often as policy_0 drew it (mean weight 1): the policy gradient's expectation
        # is over the samples as drawn, while the rows stay deduplicated as RFT's are
        weights = counts[:rows] / counts[:rows].mean()
        start = snapshot(models["rft"]) if c.rl_start == "rft" else policy_0
        trainer = _train_step_rl(r, copy_of(policy, start), jax.tree.map(lambda x: x[:rows], episodes),
                                 advantages[:rows] * weights[:, None], f"step_rl_{n}")
        models["step_rl"] = trainer.policy
        r.stages.run(f"eval_step_rl_{n}", lambda: r.evaluate(models["step_rl"]))
        data.append(_data_row(r, n, samples, owners[:rows], completions[:rows], correct[:rows],
                              counts[:rows], values[:rows], None if first_wrong is None else first_wrong[:rows]))
    export_models(run_dir, tokenizer, models)  # the largest n's policies
    if not is_main_process():  # in a multi-host job one process writes the run folder's files
        return {}
    pits = pit_statistics(values, correct, c.values.pit_threshold, first_wrong)
    return write_step_rl_report(run_dir, to_dict(c), r.stages.results, data, pits)


# ---------------------------------------------------------------- stages


def _saved_stage(r: _Run, name: str, make) -> dict:
    """Stage `name` whose data is a JSON file `synthetic/<name>.json` (written by process 0 before the stage is
    logged, so a logged stage's file exists) and whose logged result is a summary: `make()` -> (data, summary);
    the data, as every process reads it back from the file."""
    path = r.run_dir / "synthetic" / f"{name}.json"

    def run():
        data, summary = make()
        if is_main_process():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        return summary

    r.stages.run(name, run)
    sync(f"jaxreason:step_rl:{name}")  # the file is written
    return json.loads(path.read_text())


def _sample(r: _Run, policy) -> tuple[dict, dict]:
    """k samples of policy_0 for each pool problem (problem-major: row i * k + j is sample j of problem i, drawn
    with fold_in(key, row) so a problem's samples do not depend on the pool's size), checked by the task."""
    c = r.config
    began = time.perf_counter()
    problems = [i for i in range(len(r.queries)) for _ in range(c.samples_per_problem)]
    drawn = sample_continuations(policy, [r.prompts[i] for i in problems], jax.random.fold_in(r.key, 1), c.sampling,
                                 eos_ids=r.stop_ids, pad_id=r.pad_id, description="synthetic samples", mesh=r.mesh)
    texts = [r.tokenizer.decode(d.tolist(), skip_special_tokens=True) for d in drawn]
    correct = r.task.check_many([r.queries[i] for i in problems], texts)
    data = {"problem": problems, "completion": [d.tolist() for d in drawn], "correct": [bool(x) for x in correct]}
    solved = np.asarray(correct).reshape(len(r.queries), -1).any(axis=1)
    return data, {"samples": len(drawn), "generated_tokens": int(sum(len(d) for d in drawn)),
                  "accuracy": float(np.mean(correct)), "solved": float(solved.mean()),
                  "seconds": time.perf_counter() - began}


def _distinct(samples: dict) -> tuple[list[int], np.ndarray]:
    """Indices of the samples without repeats (the first of each (problem, completion), in sample order) and how
    many times each was drawn [U]."""
    rows: dict = {}  # (problem, completion) -> [first index, count]
    for i, (p, completion) in enumerate(zip(samples["problem"], samples["completion"])):
        rows.setdefault((p, tuple(completion)), [i, 0])[1] += 1
    return [i for i, _ in rows.values()], np.asarray([n for _, n in rows.values()], np.float64)


def _values(r: _Run, policy, samples: dict, unique: list[int]) -> tuple[dict, dict]:
    """Prefix values of the distinct samples, per slice of problems between consecutive sizes (so each size's
    rollout tokens are known): values [S + 1] and step_ends [S] per distinct sample, in `unique`'s order."""
    c = r.config
    began = time.perf_counter()
    owners = np.asarray([samples["problem"][i] for i in unique])
    values, ends, tokens = [], [], []
    for lo, hi in zip((0, *c.sizes[:-1]), c.sizes):
        rows = [unique[j] for j in np.flatnonzero((owners >= lo) & (owners < hi))]
        part = prefix_values(policy, task_reward(r.task, r.tokenizer), StepSplitter(r.tokenizer, r.task.step_delimiter),
                             [r.queries[samples["problem"][i]] for i in rows],
                             [r.prompts[samples["problem"][i]] for i in rows],
                             [samples["completion"][i] for i in rows], num_rollouts=c.values.num_rollouts,
                             sampling=c.values.sampling, key=jax.random.fold_in(jax.random.fold_in(r.key, 2), hi),
                             eos_ids=r.stop_ids, pad_id=r.pad_id, max_steps=c.values.max_steps, mesh=r.mesh)
        values += [v.tolist() for v in part.values]
        ends += [e.tolist() for e in part.step_ends]
        tokens.append(part.generated_tokens)
    return ({"values": values, "step_ends": ends},
            {"distinct_samples": len(unique), "rollouts": int(sum(len(e) for e in ends)) * c.values.num_rollouts,
             "rollout_tokens_by_size": dict(zip(map(str, c.sizes), np.cumsum(tokens).tolist())),
             "seconds": time.perf_counter() - began})


def _trace(r: _Run, offset: int, problem: int, completion: list[int]) -> Trace:
    prompt = r.prompts[problem]
    return Trace(problem_id=offset + problem, iteration=0, tokens=np.asarray(prompt + completion, np.int32),
                 prompt_len=len(prompt), step_ends=np.zeros(0, np.int32), step_values=np.zeros(0, np.float32),
                 reward=1.0, flags=FLAG_CORRECT)


def _train_step_rl(r: _Run, model, episodes, advantages: np.ndarray, name: str) -> PolicyTrainer:
    """Offline RL of `model` (a copy of its start, also the KL reference) on the episodes with their per-token
    advantages: shuffled batches of rft.batch_size rows, as many as RFT's rule gives these rows (stage `name`,
    checkpointed in run_dir/name, resumed from its last checkpoint)."""
    c = r.config
    num_rows = len(advantages)
    steps = c.rft.for_examples(num_rows).num_steps
    trainer = PolicyTrainer(model, c.update, mesh=r.mesh, num_updates=steps * c.updates_per_batch, seed=c.seed)
    checkpointer = trainer.checkpointer(r.run_dir / name / "checkpoints")
    history = StepHistory(r.run_dir / name / "history.json")
    meta = restore_rl_state(checkpointer, trainer)
    start = 0 if meta is None else int(meta["step"])
    history.truncate(start)
    batches = shuffled_batches(np.asarray, num_rows, c.rft.batch_size, c.seed)(start)

    def take_step(step: int) -> dict:
        rows = next(batches)
        part = jax.tree.map(lambda x: np.asarray(x)[rows], episodes)
        metrics = trainer.update(trainer.batch(part, advantages[rows]), step)
        return {"step": step + 1, **{k: metrics[k] for k in ("loss", "pg_loss", "kl", "grad_norm")}}

    began = time.perf_counter()
    run_rl_steps(name, r.run_dir, trainer, checkpointer, history, start=start, num_steps=steps,
                 checkpoint_every=c.checkpoint_every, seed=c.seed, first_row=lambda: {"step": 0},
                 take_step=take_step, postfix=lambda row: {"loss": f"{row['loss']:.4f}", "kl": f"{row['kl']:.4f}"})
    finish_rl_run(r.run_dir / name, trainer, step=steps, seed=c.seed)  # before the stage is logged
    last = history.rows[-1]
    r.stages.run(name, lambda: {"steps": steps, "examples": num_rows, "final_loss": last.get("loss"),
                                "final_kl": last.get("kl"), "seconds": time.perf_counter() - began})
    return trainer


def _first_wrong(r: _Run, owners: list[int], completions: list[list[int]]) -> list[int | None] | None:
    """The task's first wrong step of each sample (0-based, as its steps are cut by the token splitter), None
    where the text's steps and the token steps do not line up; None for a task without process labels."""
    if not r.task.has_process_labels:
        return None
    splitter = StepSplitter(r.tokenizer, r.task.step_delimiter)
    out = []
    for p, completion in zip(owners, completions):
        steps = r.task.split_steps(r.tokenizer.decode(completion, skip_special_tokens=True))
        same = len(steps) == len(splitter(completion, r.config.values.max_steps))
        out.append(r.task.first_wrong_step(r.queries[p], steps) if same else None)
    return out


def _data_row(r: _Run, n: int, samples: dict, owners, completions, correct, counts, values, first_wrong) -> dict:
    """Size n's data: samples drawn (correct ones), distinct ones, distinct positives and negatives, the tokens
    each method trains on and what the samples and their prefix rollouts cost, and the negatives' pit
    statistics (of the distinct samples)."""
    c = r.config
    drawn = n * c.samples_per_problem
    sample_tokens = sum(len(x) for x in samples["completion"][:drawn])
    lengths = np.asarray([len(x) for x in completions])
    correct = np.asarray(correct, bool)
    return {"n": n, "samples": drawn, "correct_samples": int(counts[correct].sum()), "distinct": len(completions),
            "positives": int(correct.sum()),
            "negatives": int((~correct).sum()), "problems_solved": len({p for p, ok in zip(owners, correct) if ok}),
            "sample_tokens": int(sample_tokens), "rft_tokens": int(lengths[correct].sum()),
            "step_rl_tokens": int(lengths.sum()),
            "rollout_tokens": r.stages.results["values"]["rollout_tokens_by_size"][str(n)],
            "pits": pit_statistics(values, correct, c.values.pit_threshold, first_wrong)}


def _summary(config: StepRLConfig, metrics: dict) -> str:
    if not metrics:
        return "step_rl: finished (the main process wrote the run folder)"
    last = metrics["points"][-1]
    return (f"step_rl: held-out greedy accuracy policy_0 {metrics['policy_0']:.3f}; at n = {last['n']} RFT "
            f"{last['rft']:.3f}, per-step RL {last['step_rl']:.3f}; data-efficiency ratio: "
            f"{metrics['efficiency']['headline']}\nreport: {config.run_dir}/report.md")


register_algorithm("step_rl", StepRLConfig, run_step_rl, summarize=_summary)
