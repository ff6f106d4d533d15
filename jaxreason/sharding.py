"""Device mesh and the one table that maps the models' logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer state
sharded over it, ZeRO-3 style) and `tensor` (Megatron-style splits of heads and MLP). A batch is split over
`data` x `fsdp`. Parameters carry logical names (`embed`, `heads`, ...) from `jaxreason.models`; the rules
below turn them into `PartitionSpec`s. A dimension whose size the mesh axis does not divide is replicated
instead (and said so by `describe`), never silently mis-laid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None: replicated). One table for every model.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 to take all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {self}: product {math.prod(sizes)} != {num_devices} devices")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all global devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names, under the rules table.

    A mesh axis is used at most once per array; a dimension it does not divide evenly is replicated.
    """
    return _layout(names, shape, mesh)[0]


def _layout(names, shape, mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
    """The spec, and one note per dimension replicated because its mesh axis does not divide it."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec, fallbacks = [], []
    for name, size in zip(names, shape):
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if axis is None or axis in used:
            spec.append(None)
        elif size % mesh.shape[axis]:
            fallbacks.append(f"{name} ({size}) not divisible by {axis}={mesh.shape[axis]}, replicated")
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec), fallbacks


def _variable_layout(variable: nnx.Variable, mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
    names = variable.get_metadata().get("out_sharding")
    shape = np.shape(variable.get_value())
    if names is None:
        return PartitionSpec(), []
    return _layout(names, shape, mesh)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an NNX state (parameters, or optax state built on them), leaf for leaf.

    Variables take their logical names through the rules; anything without names (step counters,
    scalars) is replicated.
    """

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(NamedSharding(mesh, _variable_layout(x, mesh)[0]))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, ...]: B split over data x fsdp, other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def put_rows(arrays: tuple, mesh: Mesh) -> tuple:
    """`arrays` placed with their rows (first axis) split over the mesh's batch axes, as `batch_sharding` splits
    them. A PRNG key array goes as its raw key data and is wrapped back: device_put refuses typed keys for a mesh
    over several processes."""
    rows = batch_sharding(mesh, ndim=1)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), rows),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, rows)

    return tuple(put(x) for x in arrays)


def batch_devices(mesh: Mesh) -> int:
    """How many parts `batch_sharding` splits a batch into (data x fsdp); its row count must divide by it."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def split_rows(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of `mesh`'s batch devices, so a batch of them splits over the mesh (`rows`
    itself without a mesh)."""
    return rows if mesh is None else -(-rows // batch_devices(mesh)) * batch_devices(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shards_weights(mesh: Mesh) -> bool:
    """Whether the rules split parameters over `mesh` (its fsdp or tensor axis is larger than 1)."""
    return mesh.shape["fsdp"] * mesh.shape["tensor"] > 1


def split_over_data(fn, mesh: Mesh, row_args: Sequence[bool]):
    """`fn` run by each device of a mesh of `data` alone on its share of the rows ([B, ...] in, [B, ...] out) of
    the arguments marked in `row_args` (the others whole, replicated): for programs whose rows do not interact,
    like searches; `jax.lax.axis_index("data")` is the device's part. Meshes that shard weights take one program
    partitioned by XLA instead (this XLA's partitioner aborts on automatic fsdp and tensor inside a manual data).
    """
    if shards_weights(mesh):
        raise ValueError(f"split_over_data needs a mesh of data alone, got {dict(mesh.shape)}")
    rows, whole = PartitionSpec("data"), PartitionSpec()
    # check_vma off: zero-initialised caches and loop carries in such programs would each need a pcast to varying.
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(rows if r else whole for r in row_args), out_specs=rows,
                         check_vma=False)


def describe(state, mesh: Mesh) -> list[str]:
    """One line per variable: path, shape, logical names, the resulting spec and any dimension replicated
    because its mesh axis does not divide it (for logs and tests)."""
    lines = []
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        spec, fallbacks = _variable_layout(var, mesh)
        line = f"{'/'.join(map(str, path))} {tuple(np.shape(var.get_value()))} {names} -> {spec}"
        lines.append(line + "".join(f"; {note}" for note in fallbacks))
    return lines
