"""GRPO (Shao et al., 2024, arXiv 2402.03300): group-relative policy optimisation with a rule-based reward.

    policy_0 <- SFT(base, gold solutions)                                  stage "sft" (as ReST-MCTS*'s)
    for step = 1 .. S:
        x_1..x_N  <- the next N training problems
        o_i1..o_iG <- G samples of pi_theta for each x_i                  (the jitted sampler, live weights)
        r_ig      <- the task's checker on o_ig                           (truncated answers: `truncation`)
        A_ig      <- (r_ig - mean_g r_ig) / std_g r_ig                     (on every token of o_ig)
                     or, with `advantage: gae`, per token: GAE on a learned critic's values, the critic then
                     regressed one step towards the returns                (`jaxreason.rl.actor_critic`)
        theta     <- mu passes of clipped-ratio updates, KL(pi_theta || pi_0) weighted by beta
        every `eval_every` steps: greedy accuracy on the held-out problems

The train state (weights, optimizer, key; the critic's too) is checkpointed every `checkpoint_every` steps and on
SIGTERM; the per-step history is saved beside it, so `--resume` continues with the losses an uninterrupted run has.
A finished run keeps the weights only (`update.keep_optimizer: true` keeps its last checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.grpo_report import write_grpo_report
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rl_steps import (
    StepHistory,
    finish_rl_run,
    group_step,
    make_critic,
    restore_rl_state,
    run_rl_steps,
)
from jaxreason.algorithms.stages import StageLog, export_models, open_run_dir
from jaxreason.config import to_dict
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch
from jaxreason.distributed import is_main_process
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.rl.actor_critic import CriticConfig, check_advantage
from jaxreason.rl.rewards import TRUNCATION_RULES, task_reward
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, pad_token_id, prompt_ids
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.tasks.base import TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective
from jaxreason.verifiers.evaluation import evaluate_verifier

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GRPOProblems:
    """The task's train split: the first `gold` problems for policy_0's SFT (ReST-MCTS*'s gold slice with the
    same seed), the next `train` for RL; and `test` held-out problems."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    train: int = 1024
    test: int = 128


@dataclasses.dataclass(frozen=True)
class GRPOEval:
    """Held-out evaluation: greedy accuracy on all `problems.test`; with `num_samples` > 0 also, on the first
    `sample_problems` of them, the mean accuracy of `num_samples` samples drawn with `baseline.sampling` and their
    self-consistency."""

    every: int = 10  # steps between held-out evaluations (and always at step 0 and at the end)
    baseline: BaselineConfig = BaselineConfig()  # greedy reads its max_new_tokens
    num_samples: int = 0
    sample_problems: int = 128


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    policy: ModelSpec
    problems: GRPOProblems = GRPOProblems()
    run_dir: str = "runs/grpo"
    seed: int = 0
    chat: bool = False
    sft: FitConfig | None = FitConfig()  # policy_0 from the base model; null: the base model is policy_0
    num_steps: int = 100
    prompts_per_step: int = 16  # N
    group_size: int = 8  # G
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0)
    # a group estimator of jaxreason.rl.advantages (grpo | rloo | dr_grpo), or gae: actor-critic with `critic`
    advantage: str = "grpo"
    critic: CriticConfig = CriticConfig()  # read with advantage gae only
    truncation: str = "zero"  # an answer cut at max_new_tokens: zero (reward 0) | mask (not trained) | keep
    update: PolicyGradientConfig = PolicyGradientConfig()
    evaluation: GRPOEval = GRPOEval()
    checkpoint_every: int = 10
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.num_steps < 1 or self.prompts_per_step < 1:
            raise ValueError("num_steps and prompts_per_step must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}")
        if self.truncation not in TRUNCATION_RULES:
            raise ValueError(f"truncation must be one of {TRUNCATION_RULES}, got {self.truncation!r}")
        check_advantage(self.advantage)  # unknown names fail at load time

    @property
    def updates_per_step(self) -> int:
        rows = self.prompts_per_step * self.group_size
        return self.update.epochs * (rows // (self.update.minibatch_rows or rows))


def run_grpo(config: GRPOConfig, resume: bool = False) -> dict:
    """Runs (or resumes) GRPO; returns the metrics also written to run_dir/metrics.json."""
    c = config
    policy, tokenizer = build_model(c.policy, c.seed)
    if tokenizer is None:
        raise ValueError(f"{c.policy.pretrained}: no tokenizer beside the weights")
    run_dir = open_run_dir(c.run_dir, to_dict(c), resume, marker="config.json")
    task = c.problems.task.build()
    pool = task.problems("train", n=c.problems.gold + c.problems.train, seed=c.seed)
    if len(pool) < c.problems.gold + c.problems.train:
        raise ValueError(f"task {c.problems.task.name}: {len(pool)} training problems, the config needs "
                         f"{c.problems.gold + c.problems.train} (problems.gold + problems.train)")
    train, test = pool[c.problems.gold:], task.problems("test", n=c.problems.test, seed=c.seed)
    mesh = sharding.make_mesh(c.mesh)
    stages = StageLog(run_dir)
    pad = pad_token_id(tokenizer)

    if c.sft is not None:
        gold = gold_traces(task, tokenizer, pool[:c.problems.gold], range(c.problems.gold), chat=c.chat)
        stages.train("sft", policy, sft_objective, gold, c.sft,
                     lambda t: sft_batch(t, c.sft.max_len, pad, tokenizer.eos_token_id), mesh=mesh, seed=c.seed)

    critic = make_critic(c, policy, mesh)  # before the policy trains: its copy of the backbone is policy_0's
    trainer = PolicyTrainer(policy, c.update, mesh=mesh, num_updates=c.num_steps * c.updates_per_step, seed=c.seed)
    checkpointer = trainer.checkpointer(run_dir / "grpo" / "checkpoints")
    history = StepHistory(run_dir / "grpo" / "history.json")
    meta = restore_rl_state(checkpointer, trainer, critic)
    start = 0 if meta is None else int(meta["step"])
    history.truncate(start)
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=c.chat) for p in train]
    # each step's problems: consecutive slices of a per-epoch permutation, re-entered at `start` on resume
    problem_rows = shuffled_batches(np.asarray, len(train), c.prompts_per_step, c.seed)(start)
    reward_fn = task_reward(task, tokenizer)
    stop_ids = eos_ids(tokenizer, policy.config)
    key = jax.random.key(c.seed)
    evaluate = lambda: _evaluate(c, trainer, tokenizer, task, test, key, mesh)

    def take_step(step: int) -> dict:
        began = time.perf_counter()
        done = group_step(trainer, train, prompts, next(problem_rows), step, key, sampling=c.sampling,
                          group_size=c.group_size, advantage=c.advantage, truncation=c.truncation, reward_fn=reward_fn,
                          eos_ids=stop_ids, pad_id=pad, mesh=mesh, critic=critic)
        episodes, rewards, groups, metrics = done.episodes, done.rewards, done.groups, done.metrics
        lengths = np.asarray(episodes.turn_lengths[:, 0])
        row = {"step": step + 1, "reward": float(rewards.mean()), "kl": metrics["kl"],
               "loss": metrics["loss"], "clip_fraction": metrics["clip_fraction"],
               "grad_norm": metrics["grad_norm"], "response_length": float(lengths.mean()),
               "truncated": float(np.mean(episodes.truncated[:, 0])),
               "solved_groups": float(np.mean(groups.max(axis=1) > 0)),
               "uniform_groups": float(np.mean(groups.min(axis=1) == groups.max(axis=1))),
               "generated_tokens": history.generated_tokens() + int(lengths.sum()),
               "seconds": time.perf_counter() - began}
        row |= {k: metrics[k] for k in ("critic_loss", "value_mae") if k in metrics}
        if (step + 1) % c.evaluation.every == 0 or step + 1 == c.num_steps:
            row["eval"] = evaluate()
        return row

    run_rl_steps("grpo", run_dir, trainer, checkpointer, history, start=start, num_steps=c.num_steps,
                 checkpoint_every=c.checkpoint_every, seed=c.seed,
                 first_row=lambda: {"step": 0, "generated_tokens": 0, "eval": evaluate()}, take_step=take_step,
                 postfix=lambda row: {"reward": f"{row['reward']:.3f}", "kl": f"{row['kl']:.4f}"}, critic=critic)
    finish_rl_run(run_dir / "grpo", trainer, critic, step=c.num_steps, seed=c.seed)
    export_models(run_dir, tokenizer, {"policy": trainer.policy})
    if not is_main_process():  # in a multi-host job one process writes the run folder's files
        return {}
    return write_grpo_report(run_dir, to_dict(c), history.rows)


def _evaluate(c: GRPOConfig, trainer: PolicyTrainer, tokenizer, task, test, key, mesh) -> dict[str, float]:
    """Greedy accuracy on the held-out problems (the same decoding as ReST-MCTS*'s evaluation) and, when asked
    for, the mean accuracy of samples ("sample") and their self-consistency ("self_consistency@N")."""
    ev = c.evaluation
    result = run_method("greedy", test, policy=trainer.policy, tokenizer=tokenizer, task=task,
                        budget=Budget(baseline=ev.baseline), key=key, chat=c.chat, mesh=mesh)
    log.info("held-out greedy accuracy %.3f", result.accuracy)
    out = {"greedy": result.accuracy}
    if ev.num_samples:
        drawn = evaluate_verifier(trainer.policy, None, tokenizer, task, test[:ev.sample_problems],
                                  sampling=ev.baseline.sampling, num_samples=ev.num_samples, sizes=(ev.num_samples,),
                                  key=jax.random.fold_in(key, 1), chat=c.chat,
                                  mesh=mesh)["selection"][str(ev.num_samples)]
        out |= {"sample": drawn["random_pick"], f"self_consistency@{ev.num_samples}": drawn["self_consistency"]}
    return out


def _summary(config: GRPOConfig, metrics: dict) -> str:
    if not metrics:
        return "grpo: finished (the main process wrote the run folder)"
    first, last = metrics["evaluations"][0], metrics["evaluations"][-1]
    return (f"grpo: held-out greedy accuracy {first['greedy']:.3f} (policy_0) -> {last['greedy']:.3f} after "
            f"{last['step']} steps\nreport: {config.run_dir}/report.md")


register_algorithm("grpo", GRPOConfig, run_grpo, summarize=_summary)
