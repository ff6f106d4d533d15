"""Train a model in place on a batch stream: the sharded step, orbax checkpoints and metrics in one call.

The outer loops in `jaxreason.algorithms` train several models in sequence (policy SFT, PRM regression);
each call gets its own checkpoint folder, so a stopped run resumes inside the stage that was running, and a
stage that already finished restores its final state instead of training again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxreason.distributed import is_main_process
from jaxreason.train.checkpoint import CheckpointConfig, Checkpointer
from jaxreason.train.loop import LoopResult, run_training
from jaxreason.train.metrics import MetricsLogger
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import Objective, init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """One training stage: steps, batch, optimizer and checkpoints.

    The optimizer's schedule spans the stage's `num_steps` unless `optimizer.total_steps` is set.
    """

    num_steps: int = 100  # with `epochs`: at most this many
    epochs: float | None = None  # train for this many passes over the stage's data (a small, growing set)
    batch_size: int = 16
    max_len: int = 128
    optimizer: OptimizerConfig = OptimizerConfig()
    # a stage saves at its end (and on SIGTERM) only, and keeps that one checkpoint
    checkpoint: CheckpointConfig = CheckpointConfig(every=0, keep=1)
    # a finished stage of a multi-stage run keeps its weights only; true keeps its last full checkpoint (optimizer
    # state included, about 3x the weights' bytes with Adam) beside them
    keep_optimizer: bool = False
    # an example longer than max_len: drop (left out of the stage, counted in its result and the log) | error
    overlong: str = "drop"

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.overlong not in ("drop", "error"):
            raise ValueError(f"overlong must be 'drop' or 'error', got {self.overlong!r}")

    def for_examples(self, n: int) -> FitConfig:
        """This config with num_steps set for `n` training examples when `epochs` is given."""
        if self.epochs is None:
            return self
        steps = math.ceil(self.epochs * n / self.batch_size)
        return dataclasses.replace(self, num_steps=max(1, min(self.num_steps, steps)))


def fit(
    model: nnx.Module,
    objective: Objective,
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]],
    config: FitConfig,
    *,
    mesh: Mesh,
    directory: str | Path,
    seed: int,
    description: str,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> LoopResult:
    """Trains `model` (updated in place) for `config.num_steps` on `batches(position)`.

    Checkpoints go to `directory/checkpoints`, metrics to `directory/<description>_metrics.jsonl`. When the
    folder already holds the final checkpoint, the model gets that state and no step runs.
    """
    directory = Path(directory)
    optimizer = make_optimizer(config.optimizer.for_steps(config.num_steps))
    graphdef, state, shardings = init_train_state(model, optimizer, mesh, trainable, seed=seed)
    step = make_train_step(graphdef, objective, optimizer, shardings, mesh)
    checkpointer = Checkpointer.from_config(directory / "checkpoints", config.checkpoint)
    logger = MetricsLogger(directory, description) if is_main_process() else None
    try:
        result = run_training(step, state, batches, num_steps=config.num_steps, seed=seed,
                              checkpointer=checkpointer, logger=logger, description=description)
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()
    nnx.update(model, result.state.trainable, result.state.frozen)
    return result
