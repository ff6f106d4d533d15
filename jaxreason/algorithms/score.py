"""SCoRe (Kumar et al. 2024, arXiv 2409.12917): two-attempt self-correction trained by multi-turn on-policy RL.

    policy_0 <- SFT(base, gold solutions)                         stage "sft" (as ReST-MCTS*'s)
                then SFT on (x, y*, I, y*)                        stage "format" (a model new to the instruction)
    base     =  policy_0 answering, then answering again after the instruction I (no training)
    baselines from the base model's episodes on training problems:
        STaR     <- SFT(base, y2 of the episodes with y1 wrong and y2 right)
        Pair-SFT <- SFT(base, (x, y1 wrong, I, y1' right): two first attempts of the same problem)
    SCoRe, from the base, for each phase of `schedule`, per step:
        x_1..x_N <- the next N training problems;  G episodes (y1, I, y2) of each from pi_theta (live weights)
        r1, r2   <- the task's checker on y1 and y2
        Stage I:  max E[r2] - beta2 KL(pi_theta(y1|x) || pi_base);  y2 unregularised (the paper's eq. 3)
        Stage II: max E[r1 + r2 + alpha (r2 - r1)] - beta1 (KL on y1 + KL on y2)  (eq. 4)
        advantages: `advantage` (leave-one-out by default) over the G episodes of a problem, per attempt
    every `evaluation.every` steps, and at the end of each phase: Acc@t1, Acc@t2, Delta, Delta i->c, Delta c->i
    on the held-out problems

In Stage II attempt 1 is credited with its own reward and the one it leads to (r1 + r2); the shaping bonus
alpha (r2 - r1) scores the change and goes to attempt 2 only (on attempt 1 it would reward a wrong first try).
Attempt 2's reward is taken relative to r1 before the group estimator: r1 is fixed before attempt 2 starts, so
as a baseline it leaves the gradient's expectation alone, while the group's episodes, each with its own first
attempt, would otherwise mostly tell whether attempt 1 was right (a copied right answer would be reinforced and
a copied wrong one punished, which taught this tiny model to stop copying altogether).

A multi-process job runs every stage on every process; process 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import copy_of, snapshot
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rl_steps import StepHistory, finish_rl_run, restore_rl_state, run_rl_steps
from jaxreason.algorithms.score_report import write_score_report
from jaxreason.algorithms.self_correction import (
    DEFAULT_INSTRUCTION,
    CheckedEpisodes,
    correction_metrics,
    correction_pairs,
    draw_episodes,
    instruction_ids,
    star_corrections,
    two_attempt_trace,
)
from jaxreason.algorithms.stages import StageLog, export_models, open_run_dir
from jaxreason.config import to_dict
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch
from jaxreason.distributed import is_main_process, sync
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.rl.advantages import get_advantage, per_token
from jaxreason.rl.rewards import checked_rewards, task_reward
from jaxreason.rl.rollouts import sample_episodes
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.tasks.base import TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScoreProblems:
    """The task's train split: the first `gold` problems for policy_0's SFT (ReST-MCTS*'s gold slice with the
    same seed), the next `train` for RL and the baselines' samples; and `test` held-out problems."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    train: int = 1024
    test: int = 128


@dataclasses.dataclass(frozen=True)
class Phase:
    """`steps` RL steps of SCoRe's Stage `stage` (1 or 2)."""

    stage: int
    steps: int

    def __post_init__(self):
        if self.stage not in (1, 2) or self.steps < 1:
            raise ValueError(f"a schedule phase needs stage 1 or 2 and steps >= 1, got {self.stage}, {self.steps}")


@dataclasses.dataclass(frozen=True)
class ScoreBaselines:
    """STaR and Pair-SFT, trained from the base model on its own episodes: `group_size` episodes of each of the
    first `problems` training problems."""

    star: bool = True
    pair_sft: bool = True
    problems: int = 256
    group_size: int = 4
    pairs_per_problem: int = 4
    train: FitConfig = FitConfig()


@dataclasses.dataclass(frozen=True)
class ScoreEval:
    """Held-out evaluation: `num_samples` episodes of each of `problems.test` (`sampling`; temperature 0 is
    greedy and needs num_samples 1)."""

    every: int = 20  # steps between evaluations (and at step 0, at each phase's end and at the end)
    num_samples: int = 4
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    policy: ModelSpec
    problems: ScoreProblems = ScoreProblems()
    run_dir: str = "runs/score"
    seed: int = 0
    chat: bool = False  # prompts and the instruction through the tokenizer's chat template (instruct models)
    instruction: str = DEFAULT_INSTRUCTION
    sft: FitConfig | None = FitConfig()  # policy_0 from gold solutions; null: the base model is policy_0
    format_sft: FitConfig | None = None  # attempt 2 after the instruction on gold (x, y*, I, y*); null: none
    schedule: tuple[Phase, ...] = (Phase(1, 50), Phase(2, 100))
    prompts_per_step: int = 16  # N
    group_size: int = 4  # G
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    advantage: str = "rloo"  # a group estimator of jaxreason.rl.advantages
    beta1: float = 0.01  # Stage II's KL weight on both attempts
    beta2: float = 0.1  # Stage I's KL weight on attempt 1: keeps the first attempt at the base model's
    alpha: float = 10.0  # Stage II's shaping bonus alpha (r2 - r1) on attempt 2
    update: PolicyGradientConfig = PolicyGradientConfig()  # its kl_coef is unused: beta1 and beta2 set the KL
    baselines: ScoreBaselines = ScoreBaselines()
    evaluation: ScoreEval = ScoreEval()
    sample_batch: int = 64  # problems per sampler call when evaluating and drawing the baselines' episodes
    checkpoint_every: int = 20
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if not self.schedule:
            raise ValueError("schedule: no phases")
        if self.prompts_per_step < 1 or self.sample_batch < 1:
            raise ValueError("prompts_per_step and sample_batch must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare episodes of a problem), got "
                             f"{self.group_size}")
        if min(self.beta1, self.beta2, self.alpha) < 0:
            raise ValueError(f"beta1, beta2 and alpha must be >= 0, got {self.beta1}, {self.beta2}, {self.alpha}")
        ev = self.evaluation
        if ev.num_samples < 1 or ev.every < 1:
            raise ValueError("evaluation.num_samples and evaluation.every must be >= 1")
        if ev.sampling.temperature == 0 and ev.num_samples > 1:
            raise ValueError("evaluation: greedy decoding (temperature 0) draws one episode per problem; set "
                             "num_samples: 1")
        get_advantage(self.advantage)  # unknown names fail at load time

    @property
    def num_steps(self) -> int:
        return sum(p.steps for p in self.schedule)

    def stage_at(self, step: int) -> int:
        """The SCoRe stage of 0-based step `step`."""
        for phase in self.schedule:
            if step < phase.steps:
                return phase.stage
            step -= phase.steps
        raise IndexError(step)

    @property
    def phase_ends(self) -> list[int]:
        return np.cumsum([p.steps for p in self.schedule]).tolist()

    @property
    def updates_per_step(self) -> int:
        rows = self.prompts_per_step * self.group_size
        return self.update.epochs * (rows // (self.update.minibatch_rows or rows))


@dataclasses.dataclass
class _Run:
    config: ScoreConfig
    run_dir: Path
    task: object
    tokenizer: object
    mesh: jax.sharding.Mesh
    stages: StageLog
    train: list
    test: list
    instruction: list[int]
    eos: tuple[int, ...]
    key: jax.Array

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def prompts(self, problems) -> list[list[int]]:
        return [prompt_ids(self.tokenizer, self.task.prompt(p), chat=self.config.chat) for p in problems]

    def draw(self, policy, problems, key, sampling: SamplingConfig, group_size: int) -> CheckedEpisodes:
        return draw_episodes(policy, problems, self.prompts(problems), self.instruction,
                             task_reward(self.task, self.tokenizer), key, sampling, group_size=group_size,
                             chunk=min(self.config.sample_batch, len(problems)), eos_ids=self.eos, pad_id=self.pad_id,
                             mesh=self.mesh)

    def evaluate(self, policy) -> dict[str, float]:
        """The held-out self-correction metrics; every model is evaluated with the same key (the same draws
        where the models agree), so differences between them are not sampling noise of the evaluation."""
        ev = self.config.evaluation
        episodes = self.draw(policy, self.test, jax.random.fold_in(self.key, 1), ev.sampling, ev.num_samples)
        return correction_metrics(np.asarray(episodes.rewards)) | {"changed": _changed(episodes)}

    def sft(self, name: str, model, traces) -> None:
        fit = self.config.baselines.train if name != "format" else self.config.format_sft
        self.stages.train(name, model, sft_objective, traces, fit,
                          lambda t: sft_batch(t, fit.max_len, self.pad_id, self.tokenizer.eos_token_id),
                          mesh=self.mesh, seed=self.config.seed)


def run_score(config: ScoreConfig, resume: bool = False) -> dict:
    """Runs (or resumes) SCoRe and its baselines; returns the metrics also written to run_dir/metrics.json."""
    c = config
    policy, tokenizer = build_model(c.policy, c.seed)
    if tokenizer is None:
        raise ValueError(f"{c.policy.pretrained}: no tokenizer beside the weights")
    run_dir = open_run_dir(c.run_dir, to_dict(c), resume, marker="config.json")
    task = c.problems.task.build()
    p = c.problems
    pool = task.problems("train", n=p.gold + p.train, seed=c.seed)
    if len(pool) < p.gold + p.train:
        raise ValueError(f"task {p.task.name}: {len(pool)} training problems, the config needs {p.gold + p.train} "
                         "(problems.gold + problems.train)")
    if c.baselines.problems > p.train:
        raise ValueError(f"baselines.problems ({c.baselines.problems}) exceeds problems.train ({p.train})")
    r = _Run(config=c, run_dir=run_dir, task=task, tokenizer=tokenizer, mesh=sharding.make_mesh(c.mesh),
             stages=StageLog(run_dir), train=pool[p.gold:], test=task.problems("test", n=p.test, seed=c.seed),
             instruction=instruction_ids(tokenizer, c.instruction, chat=c.chat), eos=eos_ids(tokenizer, policy.config),
             key=jax.random.key(c.seed))

    if c.sft is not None:
        gold = gold_traces(task, tokenizer, pool[:p.gold], range(p.gold), chat=c.chat)
        r.stages.train("sft", policy, sft_objective, gold, c.sft,
                       lambda t: sft_batch(t, c.sft.max_len, r.pad_id, tokenizer.eos_token_id), mesh=r.mesh,
                       seed=c.seed)
    if c.format_sft is not None:
        r.sft("format", policy, _format_traces(r, pool[:p.gold]))
    base = snapshot(policy)
    results = {"base": r.stages.run("eval_base", lambda: r.evaluate(policy))}
    models = {}
    if c.baselines.star or c.baselines.pair_sft:
        episodes = _base_episodes(r, policy)
        eos = tokenizer.eos_token_id
        data = {"star": lambda: star_corrections(episodes, r.instruction, eos),
                "pair_sft": lambda: correction_pairs(episodes, r.instruction, eos, c.baselines.pairs_per_problem,
                                                     c.seed)}
        for name in ("star", "pair_sft"):
            if getattr(c.baselines, name):
                models[name] = copy_of(policy, base)
                r.sft(name, models[name], data[name]())
                results[name] = r.stages.run(f"eval_{name}", lambda: r.evaluate(models[name]))
    trainer = _reinforce(r, copy_of(policy, base), results["base"])
    export_models(run_dir, tokenizer, {"policy": trainer.policy, **models})
    if not is_main_process():  # in a multi-host job one process writes the run folder's files
        return {}
    return write_score_report(run_dir, to_dict(c), r.stages.results, StepHistory(_history_path(r)).rows)


def _format_traces(r: _Run, problems) -> list:
    """Gold solution, instruction, the gold solution again, all trained: the two-attempt layout for a model that
    has never seen the instruction (what follows it is a solution). It teaches no correction; training attempt 2
    alone made this tiny model forget how to write attempt 1 (held-out Acc@t1 0.47 -> 0.00)."""
    eos = r.tokenizer.eos_token_id
    prompts = r.prompts(problems)
    traces = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        gold = r.tokenizer.encode(r.task.format_solution(problem.solution_steps, problem.answer),
                                  add_special_tokens=False)
        traces.append(two_attempt_trace(prompt, gold, r.instruction, gold, eos, i, train_first=True))
    return traces


def _base_episodes(r: _Run, policy) -> CheckedEpisodes:
    """The base model's episodes on the first `baselines.problems` training problems, kept in the run folder
    (`baselines/episodes.json`, written atomically by process 0; every process draws the same episodes) so a
    resumed run trains the baselines on the same data."""
    b = r.config.baselines
    path = r.run_dir / "baselines" / "episodes.json"
    if path.exists():
        raw = json.loads(path.read_text())
        return CheckedEpisodes(prompts=raw["prompts"], first=raw["first"], second=raw["second"],
                               rewards=np.asarray(raw["rewards"], np.float32),
                               problem_index=np.asarray(raw["problem_index"], np.int32))
    sync("jaxreason:score:base_episodes")  # every process looked for the file before process 0 writes it
    episodes = r.draw(policy, r.train[:b.problems], jax.random.fold_in(r.key, 2), r.config.sampling, b.group_size)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prompts": episodes.prompts, "first": [list(map(int, a)) for a in episodes.first],
                                   "second": [list(map(int, a)) for a in episodes.second],
                                   "rewards": np.asarray(episodes.rewards).tolist(),
                                   "problem_index": np.asarray(episodes.problem_index).tolist()}))
        os.replace(tmp, path)
    r.stages.run("base_episodes", lambda: correction_metrics(np.asarray(episodes.rewards)))
    return episodes


def _history_path(r: _Run) -> Path:
    return r.run_dir / "score" / "history.json"


def _reinforce(r: _Run, policy, base_metrics: dict) -> PolicyTrainer:
    """SCoRe's RL phases from the base model; returns the trainer holding the final policy."""
    c = r.config
    trainer = PolicyTrainer(policy, c.update, mesh=r.mesh, num_updates=c.num_steps * c.updates_per_step, seed=c.seed)
    checkpointer = trainer.checkpointer(r.run_dir / "score" / "checkpoints")
    history = StepHistory(_history_path(r))
    meta = restore_rl_state(checkpointer, trainer)
    start = 0 if meta is None else int(meta["step"])
    history.truncate(start)
    prompts = r.prompts(r.train)
    problem_rows = shuffled_batches(np.asarray, len(r.train), c.prompts_per_step, c.seed)(start)
    reward_fn = task_reward(r.task, r.tokenizer)
    key = jax.random.fold_in(r.key, 3)

    def take_step(step: int) -> dict:
        began = time.perf_counter()
        stage = c.stage_at(step)
        rows = next(problem_rows)
        episodes = sample_episodes(trainer.policy, [prompts[i] for i in rows], jax.random.fold_in(key, step),
                                   c.sampling, group_size=c.group_size, eos_ids=r.eos, pad_id=r.pad_id,
                                   instructions=[r.instruction], mesh=r.mesh)
        owners = rows[np.asarray(episodes.prompt_index)]
        rewards = np.stack([checked_rewards(reward_fn, [r.train[i] for i in owners], [prompts[i] for i in owners],
                                            episodes.attempt(j)) for j in (0, 1)], axis=1)
        rewards = np.where(np.asarray(episodes.truncated), 0.0, rewards)  # an unfinished attempt scores 0
        turn_advantages, kl = _stage_objective(c, stage, rewards)
        batch = trainer.batch(episodes, per_token(turn_advantages, episodes.token_turn),
                              kl_coefs=per_token(np.tile(kl, (len(rewards), 1)), episodes.token_turn))
        metrics = trainer.update(batch, step)
        lengths = np.asarray(episodes.turn_lengths)
        row = {"step": step + 1, "stage": stage, "reward_t1": float(rewards[:, 0].mean()),
               "reward_t2": float(rewards[:, 1].mean()),
               **{f"train_{k}": v for k, v in correction_metrics(rewards).items() if k.startswith("delta_")},
               "kl": metrics["kl"], "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
               "length_t1": float(lengths[:, 0].mean()), "length_t2": float(lengths[:, 1].mean()),
               "generated_tokens": history.generated_tokens() + int(lengths.sum()),
               "seconds": time.perf_counter() - began}
        if (step + 1) % c.evaluation.every == 0 or step + 1 in c.phase_ends:
            row["eval"] = r.evaluate(trainer.policy)
        return row

    run_rl_steps("score", r.run_dir, trainer, checkpointer, history, start=start, num_steps=c.num_steps,
                 checkpoint_every=c.checkpoint_every, seed=c.seed,
                 first_row=lambda: {"step": 0, "stage": 0, "generated_tokens": 0, "eval": base_metrics},
                 take_step=take_step,
                 postfix=lambda row: {"stage": row["stage"], "r1": f"{row['reward_t1']:.3f}",
                                      "r2": f"{row['reward_t2']:.3f}"})
    finish_rl_run(r.run_dir / "score", trainer, step=c.num_steps, seed=c.seed)
    return trainer


def _stage_objective(c: ScoreConfig, stage: int, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-attempt advantages [R, 2] and KL weights [2] of a stage, from the attempts' rewards [R, 2] (rows
    problem-major, `group_size` per problem)."""
    advantage = get_advantage(c.advantage)
    groups = lambda x: np.asarray(advantage(x.reshape(-1, c.group_size))).reshape(-1)
    r1, r2 = rewards[:, 0], rewards[:, 1]
    if stage == 1:
        return np.stack([np.zeros_like(r1), groups(r2 - r1)], axis=1), np.asarray([c.beta2, 0.0], np.float32)
    shaped = r2 + c.alpha * (r2 - r1)
    return np.stack([groups(r1 + r2), groups(shaped - r1)], axis=1), np.asarray([c.beta1, c.beta1], np.float32)


def _changed(episodes: CheckedEpisodes) -> float:
    """The fraction of episodes whose second attempt differs from the first (0: the "change nothing" collapse)."""
    return float(np.mean([list(a) != list(b) for a, b in zip(episodes.first, episodes.second)]))


def _summary(config: ScoreConfig, metrics: dict) -> str:
    if not metrics:
        return "score: finished (the main process wrote the run folder)"
    rows = metrics["models"]
    shown = "; ".join(f"{name}: Acc@t1 {m['acc_t1']:.3f}, Acc@t2 {m['acc_t2']:.3f}, Delta {m['delta']:+.3f}"
                      for name, m in rows.items())
    return f"score: held-out {shown}\nreport: {config.run_dir}/report.md"


register_algorithm("score", ScoreConfig, run_score, summarize=_summary)
