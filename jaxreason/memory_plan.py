"""How many bytes a training algorithm's config needs on each device, planned without allocating any.

`python -m jaxreason plan --config X.yaml [--devices N] [key=value ...]` builds every model abstractly
(`nnx.eval_shape`; a pretrained model is read from its config.json alone, no weights), lays it out on an
abstract (data, fsdp, tensor) mesh of N devices with the logical-axis rules of `jaxreason.sharding`, and sums:

  parameters   float32 master weights, sharded as the train step lays them out;
  gradients    the same bytes again (float32, sharded as the parameters);
  optimizer    the AdamW state of `jaxreason.train.optimizer.make_optimizer` (`jax.eval_shape` of its init);
  activations  of one training step on one device's rows (stage batch / (data x fsdp), no micro-batching):
               what autodiff keeps for the backward pass (the residuals of `jax.vjp` of the stage's objective,
               from `jax.eval_shape`) plus the gradient of the model's output, the largest buffer the backward
               makes; with and without remat (with: plus one layer's residuals, which the backward recomputes
               and holds while it passes that layer). This is the program JAX hands to XLA: XLA's fusion and
               buffer reuse can lower it, its own transients raise it (on a 4-layer model, XLA:CPU's temporary
               buffers came within 10% of it, except bfloat16 without remat: 40% more), and a `tensor` axis's
               split of heads and MLP is not applied (an upper bound then). Residuals shaped as a parameter are
               the parameter (not counted again) or a cast copy of it, sharded as the parameter;
  search       the KV caches of one MCTS expansion on one device's rows (`search.batch_size` / (data x fsdp),
               as `jaxreason.search.mcts` splits a batch): the prompts' cache, the node prefill's cache and the
               candidates' decode cache of the policy, and the PRM's prefix cache with its K per-candidate
               copies; plus the weights the search reads, a copy in the compute dtype sharded by the same rules
               (`jaxreason.sampling.placement`; none for a float32 model).

The peak per device is the larger of the training step (every model's parameters, and the gradients,
optimizer state and activations of the model being trained) and the search. Copies of a model an algorithm
keeps besides (ReST-MCTS*'s snapshot of policy_0, its ReST-EM policy) are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from jaxreason import sharding
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.config import ModelConfig
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import CausalLM
from jaxreason.models.pretrained import resolve_model_path
from jaxreason.models.spec import DTYPES, ModelSpec
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.placement import cast_state
from jaxreason.search.config import MCTSConfig
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective, value_objective
from jaxreason.train.optimizer import make_optimizer

GIB = 2**30
# The policy's training stage: the first of these fields a config has (ReST-MCTS*'s self-training SFT first).
POLICY_STAGES = ("policy_train", "sft", "train", "rft")
MAX_DEVICES = 4096  # where `devices_needed` stops looking


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Bytes per device of one model (0 where the config does not use that part)."""

    name: str
    kind: str  # "CausalLM" | "ValueModel"
    num_params: int
    params: int  # sharded over the mesh as the train step lays it out
    search_weights: int  # the search's copy in the compute dtype (0: it reads the parameters themselves)
    gradients: int
    optimizer: int
    activations: int  # with the config's remat
    activations_other: int  # with the other remat setting (not in the totals)
    remat: bool
    rows: int  # training rows per device
    max_len: int
    kv_cache: int

    @property
    def training(self) -> int:
        """What training this model adds to the resident parameters."""
        return self.gradients + self.optimizer + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: dict[str, int]
    models: tuple[ModelPlan, ...]
    search_rows: int  # 0: the config has no search

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def training_peak(self) -> int:
        resident = sum(m.params for m in self.models)
        return resident + max(m.training for m in self.models)

    @property
    def search_peak(self) -> int:
        if not self.search_rows:
            return 0
        return sum(m.params + m.search_weights + m.kv_cache for m in self.models)

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.search_peak)


def plan_config(config, devices: int, prompt_len: int = 256) -> Plan:
    """The plan of an algorithm config (`load_algorithm_config`) on `devices` devices of its mesh.

    `prompt_len`: the longest prompt the search sees, in tokens (the config does not say; a prompt is data).
    """
    spec, mesh_config = getattr(config, "policy", None), getattr(config, "mesh", None)
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"{type(config).__name__} has no `policy:` model to plan")
    if not isinstance(mesh_config, sharding.MeshConfig):
        raise ValueError(f"{type(config).__name__} has no `mesh:` to plan for")
    mesh = AbstractMesh(mesh_config.shape(devices), sharding.MESH_AXES)
    model_config = read_model_config(spec)
    mcts = getattr(config, "search", None)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    search_rows = -(-mcts.batch_size // batch_devices) if isinstance(mcts, MCTSConfig) else 0
    stage = next((s for s in (getattr(config, f, None) for f in POLICY_STAGES) if isinstance(s, FitConfig)), None)
    prm_stage = getattr(config, "prm_train", None)
    models = [_model_plan("policy", model_config, spec, stage, mesh, sft_objective,
                          _policy_kv(model_config, spec, mcts, search_rows, prompt_len))]
    if isinstance(prm_stage, FitConfig):
        models.append(_model_plan("prm", model_config, spec, prm_stage, mesh,
                                  value_objective(getattr(config, "prm_loss", "mse"),
                                                  getattr(config, "prm_lm_weight", 0.0)),
                                  _verifier_kv(model_config, spec, mcts, search_rows, prompt_len),
                                  likelihood=getattr(config, "prm_likelihood", False)))
    return Plan(mesh=dict(mesh.shape), models=tuple(models), search_rows=search_rows)


def devices_needed(config, memory: int, start: int, prompt_len: int = 256) -> int | None:
    """The fewest devices whose peak fits in `memory` bytes, among the counts from `start` that the mesh allows
    and a job asks for (the mesh's fixed axes times a power of two); None: none up to `MAX_DEVICES`, or the mesh
    fixes its device count."""
    mesh = config.mesh
    if -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
        return None
    fixed = math.prod(s for s in (mesh.data, mesh.fsdp, mesh.tensor) if s != -1)
    for n in (fixed * 2**k for k in range(MAX_DEVICES.bit_length())):
        if n < start or n > MAX_DEVICES:
            continue
        try:
            if plan_config(config, n, prompt_len).peak <= memory:
                return n
        except ValueError:  # a batch this count does not split evenly
            continue
    return None


def read_model_config(spec: ModelSpec) -> ModelConfig:
    """The model's shapes: a scratch model's, or a pretrained folder's config.json (no weights read)."""
    if spec.scratch is not None:
        s, tokenizer = spec.scratch, build_char_tokenizer()
        return ModelConfig(
            vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_layers=s.num_layers, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
            max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tie_word_embeddings)
    path = resolve_model_path(spec.pretrained)
    if not path.is_dir():
        raise ValueError(f"{path}: the plan reads a model's shapes from a folder's config.json, not from {path.name}")
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    return ModelConfig.from_hf(json.loads(file.read_text()), source=str(file))


def state_bytes(state, mesh: AbstractMesh) -> int:
    """Bytes per device of an abstract NNX state (or an optax state built on one): variables split as their
    logical names say under `sharding.LOGICAL_AXIS_RULES`, everything else replicated."""
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        total += _shard_bytes(value.shape, value.dtype, names, mesh)
    return total


def _shard_bytes(shape, dtype, names, mesh: AbstractMesh) -> int:
    spec = sharding.logical_to_spec(names, shape, mesh) if names is not None else ()
    parts = math.prod(mesh.shape[axis] for axis in spec if axis is not None)
    return math.prod(shape) * np.dtype(dtype).itemsize // parts


def _model_plan(name, model_config, spec: ModelSpec, stage: FitConfig | None, mesh: AbstractMesh, objective,
                kv_cache: int, likelihood: bool = False) -> ModelPlan:
    cls = CausalLM if name == "policy" else ValueModel
    options = dict(likelihood=likelihood) if cls is ValueModel else {}
    model = nnx.eval_shape(lambda: cls(model_config, dtype=DTYPES[spec.dtype], remat=spec.remat, rngs=nnx.Rngs(0),
                                       **options))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    sharded = state_bytes(params, mesh)
    optimizer = gradients = activations = other = rows = 0
    if stage is not None:
        batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        if stage.batch_size % batch_devices:
            raise ValueError(f"{name}'s batch of {stage.batch_size} rows does not split over data x fsdp = "
                             f"{batch_devices} devices")
        rows = stage.batch_size // batch_devices
        opt_state = jax.eval_shape(make_optimizer(stage.optimizer.for_steps(stage.num_steps)).init, params)
        optimizer, gradients = state_bytes(opt_state, mesh), sharded
        saved = activation_bytes(model, objective, rows, stage.max_len, mesh)
        activations, other = saved[spec.remat], saved[not spec.remat]
    return ModelPlan(name=name, kind=cls.__name__, num_params=sum(x.size for x in leaves),
                     params=sharded, search_weights=_search_weights(params, spec, mesh), gradients=gradients,
                     optimizer=optimizer,
                     activations=activations, activations_other=other, remat=spec.remat, rows=rows,
                     max_len=stage.max_len if stage else 0, kv_cache=kv_cache)


def activation_bytes(model: nnx.Module, objective, rows: int, max_len: int, mesh: AbstractMesh) -> dict[bool, int]:
    """{remat: bytes} the backward pass of `objective` on [rows, max_len] keeps (see the module docstring); with
    remat, also one layer's residuals, which the backward recomputes and holds while it passes that layer."""
    batch = {k: jax.ShapeDtypeStruct((rows, max_len), jnp.int32)
             for k in ("tokens", "attention_mask", "loss_mask", "value_mask", "lm_mask")}
    batch["value_targets"] = jax.ShapeDtypeStruct((rows, max_len), jnp.float32)
    batch["solution_start"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
    reads_start = getattr(model, "likelihood", False)
    by_shape = {}
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        by_shape[var.get_value().shape] = (var.get_value().dtype, var.get_metadata().get("out_sharding"))

    def saved(remat: bool) -> tuple[int, int]:
        """Bytes of the output and of the residuals (those stacked over the layers apart)."""
        model.transformer.remat = remat
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p, b: objective(nnx.merge(graphdef, p, rest), b, None)[0]
        output = lambda p, b: nnx.merge(graphdef, p, rest)(
            b["tokens"], b["attention_mask"], **({"solution_start": b["solution_start"]} if reads_start else {}))
        residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, batch)
        total, layers = _bytes(jax.eval_shape(output, params, batch)), 0
        for r in jax.tree.leaves(residuals):
            if r.shape not in by_shape:
                size = r.size * r.dtype.itemsize
            elif r.dtype != by_shape[r.shape][0]:  # a cast copy of a parameter, split as the parameter
                size = _shard_bytes(r.shape, r.dtype, by_shape[r.shape][1], mesh)
            else:  # the parameter itself
                continue
            total += size
            layers += size if r.shape[:1] == (model.config.num_layers,) else 0
        return total, layers

    remat = model.transformer.remat
    (plain, per_layers), (rematerialised, _) = saved(False), saved(True)
    model.transformer.remat = remat
    return {False: plain, True: rematerialised + per_layers // model.config.num_layers}


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _search_weights(params, spec: ModelSpec, mesh: AbstractMesh) -> int:
    dtype = DTYPES[spec.dtype]
    if all(x.dtype == dtype for x in jax.tree.leaves(params)):
        return 0
    return state_bytes(jax.eval_shape(lambda p: cast_state(p, dtype), params), mesh)


def _kv_bytes(model_config: ModelConfig, spec: ModelSpec, rows: int, length: int) -> int:
    cache = jax.eval_shape(lambda: KVCache.init(model_config, rows, length, DTYPES[spec.dtype]))
    return _bytes(cache)


def _search_lengths(mcts: MCTSConfig, prompt_len: int) -> tuple[int, int, int]:
    """(P, W, S): the prompts' slots, the widest steps part and one step, as `jaxreason.search.mcts` sizes them."""
    return -(-prompt_len // 16) * 16, mcts.max_depth * mcts.max_step_tokens, mcts.max_step_tokens


def _policy_kv(model_config, spec, mcts, rows: int, prompt_len: int) -> int:
    """Prompts [P] + node prefill [P + W] + the K candidates' decode [S] (one action type: no template)."""
    if not rows:
        return 0
    p, w, s = _search_lengths(mcts, prompt_len)
    return (_kv_bytes(model_config, spec, rows, p) + _kv_bytes(model_config, spec, rows, p + w)
            + _kv_bytes(model_config, spec, rows * mcts.num_candidates, s))


def _verifier_kv(model_config, spec, mcts, rows: int, prompt_len: int) -> int:
    """The PRM's prefix cache [P + W + S] and its copy for each of the K candidates (`ValueVerifier.extend_scores`)."""
    if not rows:
        return 0
    p, w, s = _search_lengths(mcts, prompt_len)
    return _kv_bytes(model_config, spec, rows * (1 + mcts.num_candidates), p + w + s)


def format_plan(plan: Plan, memory: int, needed: int | None, prompt_len: int) -> str:
    """The tables `python -m jaxreason plan` prints (GiB per device)."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [f"memory plan per device: {plan.devices} device(s), mesh {mesh}; nothing allocated (jax.eval_shape)"]
    for m in plan.models:
        other = "off" if m.remat else "on"
        lines += ["", f"{m.name} ({m.kind}, {m.num_params / 1e9:.2f}e9 parameters)"]
        rows = [("parameters (float32, sharded)", m.params), ("gradients (float32, sharded)", m.gradients),
                ("optimizer state (AdamW mu, nu, counts)", m.optimizer)]
        if m.rows:
            rows += [(f"activations, remat {'on' if m.remat else 'off'} ({m.rows} rows x {m.max_len} tokens)",
                      m.activations),
                     (f"  (with remat {other}: not in the totals)", m.activations_other)]
        if plan.search_rows:
            rows += [(f"search KV caches ({plan.search_rows} rows, prompts <= {prompt_len} tokens)", m.kv_cache)]
            rows += [("search's weights (compute dtype, sharded)", m.search_weights)]
        lines += [f"  {label:<58} {_gib(value)}" for label, value in rows]
    lines += ["", f"total per device: training step {_gib(plan.training_peak).strip()}"
                  + (f", search {_gib(plan.search_peak).strip()}" if plan.search_rows else "")
                  + f"; peak {_gib(plan.peak).strip()}"]
    if plan.peak <= memory:
        lines.append(f"fits in {memory / GIB:.0f} GiB per device (H100 80GB: 80)")
    elif needed is None:
        lines.append(f"does not fit {memory / GIB:.0f} GiB; no device count up to {MAX_DEVICES} this mesh allows "
                     "makes it fit")
    else:
        lines.append(f"does not fit {memory / GIB:.0f} GiB; fits from {needed} devices with this mesh")
    lines.append("activations: jax.vjp residuals + the output's gradient, from jax.eval_shape (before XLA's fusion "
                 "and buffer reuse)")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"


def load_plan_config(path: str | Path, overrides=()):
    """The algorithm config a plan reads (`jaxreason.algorithms.registry.load_algorithm_config`)."""
    from jaxreason.algorithms.registry import load_algorithm_config

    return load_algorithm_config(path, overrides)[1]
