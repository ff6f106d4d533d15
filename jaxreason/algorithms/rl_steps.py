"""The step loop of an on-policy RL run (GRPO, SCoRe, self-play), its per-step records, and GRPO's step.

`run_rl_steps` takes the steps a run has left, one `take_step` each, and does what every such run does around
them: the per-step records (`StepHistory`, saved atomically beside the checkpoints and always before them, so a
checkpoint is never ahead of the history it resumes), TensorBoard, the progress bar, checkpoints every
`checkpoint_every` steps, at the end and on SIGTERM. An actor-critic run's checkpoints hold the critic's train
state beside the policy's (`rl_state`), so the two always resume from the same step. Once a run has taken all its
steps, `finish_rl_run` keeps its weights only (the optimizer state dropped unless `update.keep_optimizer`), which
`restore_rl_state` reads back as it reads a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxreason.algorithms.model_states import value_model_from
from jaxreason.algorithms.registry import RunInterrupted
from jaxreason.algorithms.stages import WEIGHTS
from jaxreason.distributed import is_main_process, sync
from jaxreason.rl.actor_critic import GAE, CriticTrainer
from jaxreason.rl.advantages import get_advantage, per_token
from jaxreason.rl.rewards import RewardFn, apply_truncation, checked_rewards
from jaxreason.rl.rollouts import Episodes, sample_episodes
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.train.checkpoint import StopSignal, restore_weights, save_weights
from jaxreason.train.metrics import MetricsLogger, progress


class StepHistory:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def truncate(self, step: int) -> None:
        """Drops the records after `step` (written before a crash, but not in the checkpoint resumed)."""
        self.rows = [r for r in self.rows if r["step"] <= step]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def generated_tokens(self) -> int:
        return self.rows[-1]["generated_tokens"] if self.rows else 0

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows))
        os.replace(tmp, self.path)


def make_critic(config, policy, mesh) -> CriticTrainer | None:
    """The critic of a run whose `config` (GRPO's, self-play's) says `advantage: gae`, else None: a value head on
    its own copy of `policy`'s backbone as it is now (make it before the policy trains), trained with
    `config.critic` one step per RL step. The policy's `update.micro_batches` splits its steps too."""
    if config.advantage != GAE:
        return None
    return CriticTrainer(value_model_from(policy, config.seed), config.critic, mesh=mesh,
                         num_updates=config.num_steps, seed=config.seed, micro_batches=config.update.micro_batches)


def rl_state(trainer, critic: CriticTrainer | None = None):
    """What an RL run's checkpoints hold: the policy's train state, with an actor-critic's critic beside it."""
    return trainer.state if critic is None else {"policy": trainer.state, "critic": critic.state}


FINISHED = "finished.json"  # beside `weights`: the step and seed of an RL run that took all its steps


def restore_rl_state(checkpointer, trainer, critic: CriticTrainer | None = None) -> dict | None:
    """Restores the run's `rl_state` into `trainer` (and `critic`): a finished run's weights (`finish_rl_run`;
    the optimizer state stays as initialised, as no step follows), else the latest checkpoint's. Returns their
    metadata ({"step", "seed"}), or None with neither."""
    folder = Path(checkpointer.directory).parent
    like = rl_state(trainer, critic)
    if (folder / FINISHED).exists():
        state = jax.tree.map(lambda s, w: s.replace(trainable=w["trainable"], frozen=w["frozen"]), like,
                             restore_weights(folder / WEIGHTS, _weights(like)), is_leaf=_is_train_state)
        meta = json.loads((folder / FINISHED).read_text())
    else:
        restored = checkpointer.restore_latest(like)
        if restored is None:
            return None
        _, state, meta = restored
    if critic is None:
        trainer.state = state
    else:
        trainer.state, critic.state = state["policy"], state["critic"]
    return meta


def finish_rl_run(folder: Path, trainer, critic: CriticTrainer | None = None, *, step: int, seed: int) -> None:
    """Once the RL run whose checkpoints are in `folder/checkpoints` has taken all its `step` steps: its weights
    (the policy's, and the critic's) go to `folder/weights` and its checkpoints, optimizer state and all, are
    deleted, unless `update.keep_optimizer`. Weights, then `finished.json`, then the deletion: a crash in between
    leaves the checkpoints, and the run finishes again. Call it on every process."""
    if trainer.config.keep_optimizer or (folder / FINISHED).exists():
        return
    save_weights(folder / WEIGHTS, _weights(rl_state(trainer, critic)))
    if is_main_process():
        tmp = folder / (FINISHED + ".tmp")
        tmp.write_text(json.dumps({"step": step, "seed": seed}))
        os.replace(tmp, folder / FINISHED)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    sync("jaxreason:finish_rl_run")


def _is_train_state(x) -> bool:
    return hasattr(x, "opt_state")


def _weights(state):
    """The parameters of an `rl_state` (each train state's trainable and frozen variables), no optimizer state."""
    return jax.tree.map(lambda s: {"trainable": s.trainable, "frozen": s.frozen}, state, is_leaf=_is_train_state)


def run_rl_steps(name: str, run_dir: Path, trainer, checkpointer, history: StepHistory, *, start: int,
                 num_steps: int, checkpoint_every: int, seed: int, first_row: Callable[[], dict],
                 take_step: Callable[[int], dict], postfix: Callable[[dict], dict],
                 critic: CriticTrainer | None = None) -> None:
    """Steps `start` .. `num_steps` - 1 of run `name`: `first_row()` is the step-0 record of a history still
    empty, `take_step(step)` runs one step and returns its record ({"step": step + 1, ..., "eval": {...} when it
    evaluated}), `postfix(record)` what the progress bar shows. The checkpoints hold `rl_state(trainer, critic)`.
    In a multi-host job the main process writes the history and TensorBoard. Closes `checkpointer`; raises
    RunInterrupted after the checkpoint on SIGTERM."""
    main_process = is_main_process()
    logger = MetricsLogger(run_dir, name) if main_process else None
    try:
        if not history.rows:
            history.add(first_row())
        with StopSignal() as stop, progress(num_steps, start, name) as bar:
            for step in range(start, num_steps):
                row = take_step(step)
                history.add(row)
                if logger is not None:
                    logger.log(step + 1, {k: v for k, v in row.items() if k != "eval" and v is not None}
                               | {f"eval/{m}": a for m, a in row.get("eval", {}).items()})
                bar.set_postfix(**postfix(row))
                bar.update(1)
                interrupted = stop.requested.is_set()
                if (step + 1) % checkpoint_every == 0 or step + 1 == num_steps or interrupted:
                    if main_process:  # first: a checkpoint is never ahead of the history it resumes
                        history.save()
                    checkpointer.save(step + 1, rl_state(trainer, critic), {"step": step + 1, "seed": seed},
                                      wait=interrupted)
                if interrupted:
                    raise RunInterrupted(f"{name} stopped by SIGTERM after step {step + 1} (checkpoint saved)")
        checkpointer.wait()
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()
    if main_process:
        history.save()


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """One on-policy RL step on G samples per problem: the episodes (R = N x G rows), each row's index into the
    caller's problems (`owners` [R]), the rewards after the truncation rule ([R], and as `groups` [N, G]), the
    per-token advantages the update used ([R, T]), the update's metrics (with the critic's `critic_loss` and
    `value_mae` in actor-critic)."""

    episodes: Episodes
    owners: np.ndarray
    rewards: np.ndarray
    groups: np.ndarray
    advantages: np.ndarray
    metrics: dict


def group_step(trainer, problems: Sequence, prompts: Sequence[Sequence[int]], rows: np.ndarray, step: int,
               key: jax.Array, *, sampling: SamplingConfig, group_size: int, advantage: str, truncation: str,
               reward_fn: RewardFn, eos_ids: tuple[int, ...], pad_id: int, mesh,
               critic: CriticTrainer | None = None) -> GroupStep:
    """GRPO's step on the problems `rows` (indices into `problems` and `prompts`): G samples of each from the live
    weights (key fold_in(key, step)), `reward_fn`'s rewards under the `truncation` rule, and one `trainer.update`
    with the group estimator `advantage` on every token of each sample, or, given a `critic` (advantage "gae"),
    actor-critic: GAE on the critic's values with each sample's reward on its last token
    (`rl.actor_critic`), then one critic step towards the returns."""
    episodes = sample_episodes(trainer.policy, [prompts[i] for i in rows], jax.random.fold_in(key, step), sampling,
                               group_size=group_size, eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)
    owners = rows[np.asarray(episodes.prompt_index)]
    rewards = checked_rewards(reward_fn, [problems[i] for i in owners], [prompts[i] for i in owners],
                              episodes.attempt(0))
    rewards, keep = apply_truncation(rewards, episodes.truncated[:, 0], truncation)
    groups = rewards.reshape(len(rows), group_size)
    if critic is None:
        sequence = np.asarray(get_advantage(advantage)(groups)).reshape(-1, 1)
        advantages = np.asarray(per_token(sequence, episodes.token_turn))
    else:
        mask = episodes.loss_mask() * np.asarray(keep, np.int32)[:, None]
        advantages, returns = critic.advantages(episodes, rewards, mask)
    metrics = trainer.update(trainer.batch(episodes, advantages, keep=keep), step)
    if critic is not None:
        fit = critic.update(episodes, returns, mask)
        metrics |= {"critic_loss": fit["loss"], "value_mae": fit["value_mae"]}
    return GroupStep(episodes, owners, rewards, groups, advantages, metrics)
