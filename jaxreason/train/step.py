"""The sharded train step: `jax.jit` with explicit in/out shardings and a donated state.

A model is split once into a static graph, its trainable variables and its frozen ones (a LoRA base, for
instance). The step merges them back, runs an objective `(model, batch, key) -> (loss, metrics)`,
accumulates gradients over micro-batches with `lax.scan` and applies one optax update. Shardings come from
the logical axis names through `jaxreason.sharding`, so the same step runs on one CPU or a pod.

An objective whose loss is a mean over tokens reports how many in `metrics["num_tokens"]`; micro-batches
are then weighted by their share of the batch's tokens, so an accumulated step equals the full-batch step
however the tokens fall. Objectives without that count weight their micro-batches equally.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxreason import sharding

Objective = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
TOKEN_COUNT = "num_tokens"


@struct.dataclass
class TrainState:
    """Everything a step updates, and so everything a checkpoint holds.

    `trainable`/`frozen` are NNX states; `step` is a scalar int32; `rng` is the raw data (uint32 [2] for the
    default threefry key) of the run's PRNG key, split once per step. It is stored raw so orbax can save it.
    """

    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param):
    """graphdef, trainable state, frozen state (everything not matched by `trainable`)."""
    return nnx.split(model, trainable, ...)


def init_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    trainable: nnx.filterlib.Filter = nnx.Param,
    *,
    seed: int = 0,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Splits `model`, lays its state out on `mesh` and initialises the optimizer there.

    The step keys descend from `jax.random.key(seed)`. Returns the graphdef, the placed state, and the
    state's shardings (a TrainState of NamedShardings).
    """
    graphdef, params, frozen = split_model(model, trainable)
    shardings = train_state_shardings(params, frozen, optimizer, mesh)
    params = jax.device_put(params, shardings.trainable)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(trainable=params, frozen=frozen, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, jax.device_put(state, shardings), shardings


def train_state_shardings(params, frozen, optimizer, mesh: Mesh) -> TrainState:
    opt_shape = jax.eval_shape(optimizer.init, params)
    return TrainState(
        trainable=sharding.state_shardings(params, mesh),
        frozen=sharding.state_shardings(frozen, mesh),
        opt_state=sharding.state_shardings(opt_shape, mesh),
        step=sharding.replicated(mesh),
        rng=sharding.replicated(mesh),
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    mesh: Mesh,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `step(state, batch) -> (state, metrics)`; `state` is donated. `step.trace(state, batch)`
    traces it without running.

    Batch arrays are [B, ...] with B split over the mesh's data axes; with `grad_accum_steps` = A they are
    cut into A micro-batches of B / A rows, each given its own key, whose gradients are combined (weighted
    by token count, see the module docstring) before one update.

    The same arguments (equal graph and shardings, the same objective and optimizer objects) give the same
    jitted step: a run that trains a fresh copy of a model stage after stage compiles its step once.
    """
    leaves, treedef = jax.tree.flatten(shardings)
    return _cached_train_step(graphdef, objective, optimizer, tuple(leaves), treedef, mesh, grad_accum_steps)


@functools.lru_cache(maxsize=16)
def _cached_train_step(graphdef, objective, optimizer, sharding_leaves, sharding_treedef, mesh, grad_accum_steps):
    shardings = jax.tree.unflatten(sharding_treedef, sharding_leaves)

    def loss_on(trainable, frozen, batch, key):
        model = nnx.merge(graphdef, trainable, frozen)
        return objective(model, batch, key)

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def accumulated(state: TrainState, batch, key):
        micro = jax.tree.map(_split_micro(grad_accum_steps), batch)
        grads_shape = jax.eval_shape(grad_fn, state.trainable, state.frozen,
                                     jax.tree.map(lambda x: x[0], micro), key)[1]

        def add(grad_sum, inputs):
            mb, mb_key = inputs
            (loss, metrics), grads = grad_fn(state.trainable, state.frozen, mb, mb_key)
            weight = _weight(loss, metrics)
            grad_sum = jax.tree.map(lambda s, g: s + weight.astype(g.dtype) * g, grad_sum, grads)
            return grad_sum, (loss, metrics)

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grads_shape)
        keys = jax.random.split(key, grad_accum_steps)
        grad_sum, (losses, metrics) = jax.lax.scan(add, zeros, (micro, keys))  # losses, metrics: [A]
        weights = _weight(losses, metrics)
        total = jnp.sum(weights)
        total = jnp.where(total > 0, total, 1.0)  # no tokens anywhere: every term is 0, as in the full batch
        mean = lambda x: jnp.sum(weights * x) / total
        metrics = {k: jnp.sum(v) if k == TOKEN_COUNT else mean(v) for k, v in metrics.items()}
        grads = jax.tree.map(lambda g: g / total.astype(g.dtype), grad_sum)
        return mean(losses), metrics, grads

    def step(state: TrainState, batch: dict[str, jax.Array]):
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.trainable, state.frozen, batch, step_key)
        else:
            loss, metrics, grads = accumulated(state, batch, step_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = TrainState(trainable=trainable, frozen=state.frozen, opt_state=opt_state, step=state.step + 1,
                               rng=jax.random.key_data(key))
        return new_state, metrics

    # P(("data", "fsdp")) is a prefix spec: the batch axis is split, trailing axes are replicated.
    batch_sharding = sharding.batch_sharding(mesh, ndim=1)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    def run(state: TrainState, batch: dict[str, jax.Array]):
        with jax.set_mesh(mesh):
            return jitted(state, jax.device_put(batch, batch_sharding))

    def trace(state: TrainState, batch: dict[str, jax.Array]):
        """The traced step (`.jaxpr`, `.lower()`), to check what it computes without running it."""
        with jax.set_mesh(mesh):
            return jitted.trace(state, jax.device_put(batch, batch_sharding))

    run.trace = trace
    return run


def _weight(loss: jax.Array, metrics: dict[str, jax.Array]) -> jax.Array:
    """Micro-batch weights, shaped like `loss` ([] or [A]): token counts, or 1 when the objective has none."""
    if TOKEN_COUNT in metrics:
        return metrics[TOKEN_COUNT].astype(jnp.float32)
    return jnp.ones_like(loss, jnp.float32)


def _split_micro(n: int):
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return split
