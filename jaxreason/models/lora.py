"""Low-rank adapters (LoRA) on the decoder's projection kernels.

`add_lora` attaches a pair (A [in..., r], B [r, out...]) to each chosen kernel W of every layer; the layer
then uses W + (alpha / r) * A @ B. Adapters are `LoRAParam` variables, so a train step that differentiates
only `LoRAParam` leaves the base frozen, and `lora_disabled(model)` gives the frozen base model itself:
the DPO/KL reference shares the policy's weights instead of holding a second copy.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

# kernel name -> number of leading input dimensions (the rest are output dimensions).
_ATTENTION_KERNELS = {"q": 1, "k": 1, "v": 1, "o": 2}
_MLP_KERNELS = {"gate": 1, "up": 1, "down": 1}
DEFAULT_TARGETS = tuple(_ATTENTION_KERNELS) + tuple(_MLP_KERNELS)


class LoRAParam(nnx.Variable):
    """An adapter weight; not a `Param`, so `nnx.Param` filters select the base weights only."""


def effective_kernel(module: nnx.Module, name: str) -> jax.Array:
    """The kernel `name` of `module`, plus its low-rank update when adapters are attached and enabled."""
    w = getattr(module, name)[...]
    scale = getattr(module, "lora_scale", 0.0)
    if not scale or not hasattr(module, f"{name}_lora_a"):
        return w
    a = getattr(module, f"{name}_lora_a")[...]
    b = getattr(module, f"{name}_lora_b")[...]
    return w + scale * jnp.tensordot(a, b, axes=1).astype(w.dtype)


def add_lora(model: nnx.Module, rank: int, alpha: float, *, targets=DEFAULT_TARGETS, rngs: nnx.Rngs) -> None:
    """Attaches adapters in place to every stacked decoder layer of `model` (a CausalLM or ValueModel).

    A starts random (scaled like the kernel's fan-in) and B at zero, so the model is unchanged until trained.
    """
    unknown = set(targets) - set(DEFAULT_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {DEFAULT_TARGETS}")
    layers = model.transformer.layers
    for module, kernels in ((layers.attention, _ATTENTION_KERNELS), (layers.mlp, _MLP_KERNELS)):
        for name, n_in in kernels.items():
            if name not in targets:
                continue
            kernel = getattr(module, name)
            names = kernel.get_metadata()["out_sharding"]  # ("layers", in..., out...)
            shape = kernel[...].shape
            in_shape, out_shape = shape[1 : 1 + n_in], shape[1 + n_in :]
            fan_in = int(jnp.prod(jnp.asarray(in_shape)))
            a = jax.random.normal(rngs.params(), (shape[0], *in_shape, rank), kernel[...].dtype) / fan_in**0.5
            b = jnp.zeros((shape[0], rank, *out_shape), kernel[...].dtype)
            a_names = (names[0], *names[1 : 1 + n_in], None)
            b_names = (names[0], None, *names[1 + n_in :])
            setattr(module, f"{name}_lora_a", LoRAParam(a, out_sharding=a_names, eager_sharding=False))
            setattr(module, f"{name}_lora_b", LoRAParam(b, out_sharding=b_names, eager_sharding=False))
        module.lora_scale = alpha / rank


def merged_kernels(model: nnx.Module) -> dict:
    """The model's `Param` pure dict with every adapter folded into its kernel (for export)."""
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = model.transformer.layers
    for group, module in (("attention", layers.attention), ("mlp", layers.mlp)):
        for name in DEFAULT_TARGETS:
            if hasattr(module, f"{name}_lora_a") and name in tree["transformer"]["layers"][group]:
                merged = jax.vmap(lambda w, a, b: w + module.lora_scale * jnp.tensordot(a, b, axes=1))(
                    getattr(module, name)[...], getattr(module, f"{name}_lora_a")[...],
                    getattr(module, f"{name}_lora_b")[...],
                )
                tree["transformer"]["layers"][group][name] = merged
    return tree


@contextlib.contextmanager
def lora_disabled(model: nnx.Module):
    """Within the block, `model` computes with its frozen base weights only (works inside jit)."""
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and hasattr(m, "lora_scale")]
    saved = [m.lora_scale for m in modules]
    for m in modules:
        m.lora_scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(modules, saved):
            m.lora_scale = s
