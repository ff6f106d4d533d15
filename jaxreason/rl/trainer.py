"""The policy side of on-policy RL: live weights to sample from, reference log-probs, clipped-ratio updates.

`PolicyTrainer` holds the policy's train state on the mesh. `policy` is a view of those very weights (no copy),
so rollouts always come from the weights being trained; `batch` turns episodes and their per-token advantages
into a train batch (reference log-probs included); `update` runs `epochs` passes of minibatch steps over it.
The reference for the KL term is a frozen copy of the starting weights, or, for a LoRA policy, the same weights
with the adapters switched off (no second copy).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.lora import LoRAParam, lora_disabled
from jaxreason.rl.loss import AGGREGATIONS, policy_gradient_objective, sequence_token_logprobs
from jaxreason.rl.rollouts import Episodes
from jaxreason.train.checkpoint import Checkpointer
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

REFERENCES = ("frozen", "lora_base", "none")


@dataclasses.dataclass(frozen=True)
class PolicyGradientConfig:
    """The update: PPO/GRPO clipping, the KL to the reference, and how often each rollout batch is used."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: clip_eps (a larger one is DAPO's "clip higher")
    kl_coef: float = 0.04  # GRPO's beta
    aggregation: str = "sequence_mean"  # GRPO's per-answer mean; "token_mean" weighs every token alike
    epochs: int = 1  # passes over each rollout batch (GRPO's mu); 1 with one minibatch is exactly on-policy
    minibatch_rows: int | None = None  # rows per update step; None: the whole rollout batch in one step
    # each update step's rows in this many micro-batches whose gradients add up, and the reference and old
    # log-probs in as many chunks: memory, not maths (with sequence_mean exact when no row is masked out)
    micro_batches: int = 1
    reference: str = "frozen"  # frozen: a copy of the starting weights; lora_base: adapters off; none: no KL
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, warmup_steps=0, weight_decay=0.0)
    # a finished run keeps its checkpoints, optimizer state and all (to train on from them); default: weights only
    keep_optimizer: bool = False

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.minibatch_rows is not None and self.minibatch_rows < 1:
            raise ValueError(f"minibatch_rows must be >= 1 or null, got {self.minibatch_rows}")
        if self.clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0, got {self.clip_eps}")


class PolicyTrainer:
    """The policy's train state and its RL update.

    Args:
      model: the starting policy (its weights are copied onto the mesh; the module itself is not updated).
      config: the update's settings.
      mesh: the device mesh; batches are split over its data and fsdp axes.
      num_updates: update steps of the whole run (the learning-rate schedule's length).
      seed: the train state's key and the minibatch order.
      trainable: which variables train (default `nnx.Param`; `LoRAParam` for adapters only).
    """

    def __init__(self, model: nnx.Module, config: PolicyGradientConfig, *, mesh: Mesh, num_updates: int,
                 seed: int, trainable: nnx.filterlib.Filter = nnx.Param):
        self.config = config
        self.mesh = mesh
        self.seed = seed
        optimizer = make_optimizer(config.optimizer.for_steps(num_updates))
        self.graphdef, self.state, self.shardings = init_train_state(model, optimizer, mesh, trainable, seed=seed)
        if config.reference == "lora_base" and not _has_lora(model):
            raise ValueError("reference 'lora_base' needs a policy with LoRA adapters (models.lora.add_lora)")
        # the KL reference: a copy made before the first update (training donates the live buffers)
        self.reference = (jax.tree.map(jnp.copy, (self.state.trainable, self.state.frozen))
                          if config.reference == "frozen" else None)
        # one update per batch: the ratio's denominator is the policy itself (exact, and no extra forward pass)
        self.on_policy = config.epochs == 1 and config.minibatch_rows is None
        objective = policy_gradient_objective(config.clip_eps, config.clip_eps_high, config.aggregation)
        self._step = make_train_step(self.graphdef, objective, optimizer, self.shardings, mesh,
                                     grad_accum_steps=config.micro_batches)

    @property
    def policy(self) -> nnx.Module:
        """The policy as a module over the current train state's arrays (valid until the next update)."""
        return nnx.merge(self.graphdef, self.state.trainable, self.state.frozen)

    @property
    def step(self) -> int:
        return int(self.state.step)

    def logprobs(self, tokens, attention_mask, *, reference: bool = False) -> np.ndarray:
        """[R, T] log-probs of each token under the current policy, or under the reference (0 at t = 0), in
        `micro_batches` chunks of rows."""
        chunks = self.config.micro_batches
        if len(tokens) % chunks:
            raise ValueError(f"{len(tokens)} rows do not split into {chunks} micro-batches")
        # addressable: in a multi-host job the rows lie on every process's devices; each process reads them all
        return np.concatenate([np.asarray(addressable(self._logprobs(t, m, reference))) for t, m in
                               zip(np.split(np.asarray(tokens), chunks), np.split(np.asarray(attention_mask), chunks))])

    def _logprobs(self, tokens, attention_mask, reference: bool) -> jax.Array:
        params, lora_off = (self.state.trainable, self.state.frozen), False
        if reference:
            if self.config.reference == "none":
                return jnp.zeros(np.shape(tokens), jnp.float32)
            if self.config.reference == "frozen":
                params = self.reference
            lora_off = self.config.reference == "lora_base"
        batch = jax.device_put((jnp.asarray(tokens), jnp.asarray(attention_mask)), self._batch_sharding(len(tokens)))
        with jax.set_mesh(self.mesh):
            return _logprobs(self.graphdef, params, *batch, lora_off=lora_off)

    def batch(self, episodes: Episodes, advantages, *, kl_coefs=None, keep=None) -> dict[str, np.ndarray]:
        """The train batch of `episodes`: advantages [R, T] per token (see `rl.advantages.per_token`); kl_coefs
        [R, T] per-token KL weights (default config.kl_coef on every token); keep [R] rows to train (others
        get a zero loss mask)."""
        mask = episodes.loss_mask()
        if keep is not None:
            mask = mask * np.asarray(keep, np.int32)[:, None]
        if kl_coefs is None:
            kl_coefs = np.full(mask.shape, self.config.kl_coef, np.float32)
        batch = {"tokens": np.asarray(episodes.tokens), "attention_mask": np.asarray(episodes.attention_mask),
                 "loss_mask": mask, "advantages": np.asarray(advantages, np.float32),
                 "kl_coefs": np.asarray(kl_coefs, np.float32)}
        for name in ("advantages", "kl_coefs"):
            if batch[name].shape != mask.shape:
                raise ValueError(f"{name} has shape {batch[name].shape}; the episodes are {mask.shape}")
        batch["ref_logprobs"] = self.logprobs(batch["tokens"], batch["attention_mask"], reference=True)
        if not self.on_policy:  # later updates measure their ratio against the weights that sampled the batch
            batch["old_logprobs"] = self.logprobs(batch["tokens"], batch["attention_mask"])
        return batch

    def update(self, batch: dict[str, np.ndarray], iteration: int) -> dict[str, float]:
        """`epochs` passes over `batch` in minibatches (rows shuffled per pass by (seed, iteration, pass));
        returns the metrics averaged over the steps."""
        rows = len(batch["tokens"])
        size = self.config.minibatch_rows or rows
        if rows % size:
            raise ValueError(f"{rows} rollout rows do not split into minibatches of {size}")
        history = []
        for epoch in range(self.config.epochs):
            order = np.random.default_rng([self.seed, iteration, epoch]).permutation(rows) if size < rows \
                else np.arange(rows)
            for start in range(0, rows, size):
                minibatch = {k: v[order[start:start + size]] for k, v in batch.items()}
                self.state, metrics = self._step(self.state, minibatch)
                history.append({k: float(v) for k, v in metrics.items()})
        return {k: float(np.mean([h[k] for h in history])) for k in history[0]}

    def checkpointer(self, directory: str | Path, keep: int = 2) -> Checkpointer:
        return Checkpointer(directory, save_every=1, keep=keep)

    def _batch_sharding(self, rows: int):
        devices = sharding.batch_devices(self.mesh)
        if rows % devices:
            raise ValueError(f"{rows} rows do not split over the mesh's {devices} data-parallel devices")
        return sharding.batch_sharding(self.mesh, ndim=1)


def _has_lora(model: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, LoRAParam)))


@functools.partial(jax.jit, static_argnames=("graphdef", "lora_off"))
def _logprobs(graphdef, params, tokens, attention_mask, *, lora_off: bool):
    model = nnx.merge(graphdef, *params)
    if lora_off:
        with lora_disabled(model):
            return sequence_token_logprobs(model, tokens, attention_mask)
    return sequence_token_logprobs(model, tokens, attention_mask)
