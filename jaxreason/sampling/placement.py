"""Model weights for decoding and search: laid out by the training rules, in the model's compute dtype.

Sampling and search only read the weights, so they keep no float32 master copy of a bfloat16 model: every
variable the model casts to its compute dtype before use (matrices and per-head biases: two or more dimensions
besides `layers`) is stored in it, and the rest (norm scales, a value head's vector and bias, read in float32)
keep their dtype, so the outputs are those of the model as it is. A model with LoRA adapters is not cast (its
kernels add their adapters' product in their own dtype). Under a mesh, each variable is sharded by its logical
names (`jaxreason.sharding.state_shardings`): over `fsdp` and `tensor`, replicated where the mesh has neither.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.models.llama import Transformer
from jaxreason.models.lora import LoRAParam


def inference_state(module: nnx.Module, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(module)` with its state cast and, with `mesh`, placed by the rules (one program for both)."""
    graphdef, state = nnx.split(module)
    dtype = compute_dtype(module)
    casts = dtype is not None and any(_casts(v, dtype) for _, v in nnx.to_flat_state(state))
    if not casts:
        return graphdef, state if mesh is None else jax.device_put(state, sharding.state_shardings(state, mesh))
    out = None if mesh is None else sharding.state_shardings(state, mesh)
    return graphdef, jax.jit(lambda s: cast_state(s, dtype), out_shardings=out)(state)


def compute_dtype(module: nnx.Module):
    """The dtype `module`'s transformer computes in (None for a module without one or with LoRA adapters)."""
    nodes = [node for _, node in nnx.iter_graph(module)]
    if any(isinstance(node, LoRAParam) for node in nodes):
        return None
    return next((node.dtype for node in nodes if isinstance(node, Transformer)), None)


def cast_state(state: nnx.State, dtype) -> nnx.State:
    """`state` with each variable the model casts to `dtype` before use stored in `dtype`."""
    return jax.tree.map(lambda v: v.replace(v.get_value().astype(dtype)) if _casts(v, dtype) else v, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _casts(variable: nnx.Variable, dtype) -> bool:
    value = variable.get_value()
    names = variable.get_metadata().get("out_sharding") or (None,) * np.ndim(value)
    matrix = sum(name != "layers" for name in names) >= 2
    return matrix and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != dtype
