"""Copies of a model's weights for the outer loops: a start to train several models from, and fresh modules on it.

Training donates (and so deletes) the live buffers of the model it trains; a snapshot lives in its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def snapshot(module: nnx.Module) -> nnx.State:
    """A copy of the module's state in fresh buffers."""
    return jax.tree.map(jnp.copy, nnx.state(module))


def copy_of(model: nnx.Module, state: nnx.State) -> nnx.Module:
    """A new module with `model`'s structure and a fresh copy of `state`."""
    return nnx.merge(nnx.graphdef(model), jax.tree.map(jnp.copy, state))
