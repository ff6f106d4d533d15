"""AdamW with linear warmup, cosine decay and global-norm clipping, from one frozen config."""

from __future__ import annotations

import dataclasses
import functools

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    # cosine decays to end_lr_fraction * learning_rate here; None: at the end of the training run that uses it
    total_steps: int | None = None
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps must be >= 1 or null, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:  # the cosine needs a step
            raise ValueError(
                f"optimizer.warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})"
            )

    def for_steps(self, num_steps: int) -> OptimizerConfig:
        """This config for a run of `num_steps`: `total_steps` is that when unset, the warmup at most num_steps - 1."""
        if self.total_steps is not None:
            return self
        return dataclasses.replace(self, total_steps=num_steps, warmup_steps=min(self.warmup_steps, num_steps - 1))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    if config.total_steps is None:
        raise ValueError("optimizer.total_steps is unset: build the optimizer from config.for_steps(num_steps)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.end_lr_fraction,
    )


@functools.lru_cache(maxsize=32)
def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW (clipped) for `config`; equal configs give the same object, so their train steps share a program."""
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
    if config.max_grad_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
