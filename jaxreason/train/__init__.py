"""Training: losses, objectives, the sharded jit train step, AdamW, orbax checkpoints, and `fit`, which trains a
model in place on a batch stream with all of them."""

from jaxreason.train.checkpoint import CheckpointConfig, Checkpointer
from jaxreason.train.fit import FitConfig, fit
from jaxreason.train.objectives import sft_objective, value_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import TrainState, init_train_state, make_train_step

__all__ = [
    "CheckpointConfig", "Checkpointer", "FitConfig", "OptimizerConfig", "TrainState", "fit", "init_train_state",
    "make_optimizer", "make_train_step", "sft_objective", "value_objective",
]
