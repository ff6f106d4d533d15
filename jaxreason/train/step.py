"""The sharded train step: `jax.jit` with explicit in/out shardings and a donated state.

A model is split once into a static graph, its trainable variables and its frozen ones (a LoRA base, for
instance). The step merges them back, runs an objective `(model, batch) -> (loss, metrics)`, accumulates
gradients over micro-batches with `lax.scan` and applies one optax update. Shardings come from the logical
axis names through `jaxreason.sharding`, so the same step runs on one CPU or a pod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxreason import sharding

Objective = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    """Everything a step updates. `trainable`/`frozen` are NNX states; `step` is a scalar int32."""

    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: jax.Array


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param):
    """graphdef, trainable state, frozen state (everything not matched by `trainable`)."""
    return nnx.split(model, trainable, ...)


def init_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Splits `model`, lays its state out on `mesh` and initialises the optimizer there.

    Returns the graphdef, the placed state, and the state's shardings (a TrainState of NamedShardings).
    """
    graphdef, params, frozen = split_model(model, trainable)
    shardings = train_state_shardings(params, frozen, optimizer, mesh)
    params = jax.device_put(params, shardings.trainable)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(trainable=params, frozen=frozen, opt_state=opt_state, step=jnp.zeros((), jnp.int32))
    return graphdef, jax.device_put(state, shardings), shardings


def train_state_shardings(params, frozen, optimizer, mesh: Mesh) -> TrainState:
    opt_shape = jax.eval_shape(optimizer.init, params)
    return TrainState(
        trainable=sharding.state_shardings(params, mesh),
        frozen=sharding.state_shardings(frozen, mesh),
        opt_state=sharding.state_shardings(opt_shape, mesh),
        step=sharding.replicated(mesh),
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    mesh: Mesh,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

    Batch arrays are [B, ...] with B split over the mesh's data axes; with `grad_accum_steps` = A they are
    cut into A micro-batches of B / A rows whose gradients are averaged before one update.
    """

    def loss_on(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        return objective(model, batch)

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.trainable, state.frozen, batch)
        else:
            micro = jax.tree.map(_split_micro(grad_accum_steps), batch)

            def accumulate(carry, mb):
                (loss, metrics), grads = grad_fn(state.trainable, state.frozen, mb)
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

            (loss, metrics, grads), _ = jax.lax.scan(
                accumulate, _zeros_like_outputs(grad_fn, state, micro), micro
            )
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, metrics, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = TrainState(trainable=trainable, frozen=state.frozen, opt_state=opt_state, step=state.step + 1)
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

    return run


def _split_micro(n: int):
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return split


def _zeros_like_outputs(grad_fn, state, micro):
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.trainable, state.frozen, first)
    (loss, metrics), grads = shapes
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
