"""AdamW with linear warmup, cosine decay and global-norm clipping, from one frozen config."""

from __future__ import annotations

import dataclasses
import functools

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    total_steps: int = 1000  # cosine decays to end_lr_fraction * learning_rate here
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"optimizer.warmup_steps ({self.warmup_steps}) must be in [0, total_steps={self.total_steps}]"
            )


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, 1),
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
