"""Multi-host start: `jax.distributed.initialize` when the job has several processes, nothing otherwise.

Call `initialize()` first thing in a command, before any jax computation (jax refuses to start the
distributed runtime once a backend exists). Then every process runs the same program; `is_main_process()` picks the
one that writes files, `sync(name)` waits for the others and `addressable(tree)` gathers arrays split over the
processes before that one writes them. Where the settings come from, first match wins:

1. explicit arguments, or the environment `JAXREASON_COORDINATOR` (host:port), `JAXREASON_NUM_PROCESSES`,
   `JAXREASON_PROCESS_ID` (a manual launch, `launch/local.sh -n N`, a scheduler jax does not know);
2. `JAXREASON_DISTRIBUTED=auto`: call `jax.distributed.initialize()` and let jax find the cluster (a GCE
   TPU VM pod, whose worker list is only in the metadata server: `launch/tpu_pod.sh` sets this);
   `JAXREASON_DISTRIBUTED=off` never starts it;
3. a SLURM job with more than one task, or a multi-host TPU (GKE worker list, multislice `MEGASCALE_*`):
   jax's own cluster detection (`jax/_src/clusters/`) fills in the coordinator, the process count and id
   from the same environment (it also knows Open MPI, Kubernetes and mpi4py: reach those with `auto`);
4. anything else is one process: nothing to start.

jax's SLURM detection gives each process only the GPU numbered by its local rank (one process per
GPU). With one task per node and all of the node's GPUs in it (`launch/slurm_gpu.sbatch`), the node's GPUs
come from `SLURM_GPUS_ON_NODE` unless `local_device_ids` or `JAX_LOCAL_DEVICE_IDS` says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
from flax import nnx

log = logging.getLogger(__name__)

_started = False  # this module already decided (and maybe started jax.distributed) once
_barriers = 0  # `sync` calls so far, which makes each barrier's id unique
BARRIER_TIMEOUT_S = 3600  # how long `sync` waits for the slowest process


def detect(environ: dict[str, str] | None = None) -> str | None:
    """Which cluster environment asks for a multi-process start: 'explicit', 'auto', 'slurm', 'tpu',
    or None for a single process. Reads only environment variables."""
    env = os.environ if environ is None else environ
    mode = env.get("JAXREASON_DISTRIBUTED", "").strip().lower()
    if mode in ("off", "0", "false", "none"):
        return None
    if mode not in ("", "auto"):
        raise ValueError(f"JAXREASON_DISTRIBUTED={mode!r}: expected 'auto' or 'off'")
    if any(env.get(k) for k in ("JAXREASON_COORDINATOR", "JAXREASON_NUM_PROCESSES", "JAXREASON_PROCESS_ID")):
        return "explicit"
    if mode == "auto":
        return "auto"
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS")) > 1:
        return "slurm"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") \
            or _int(env.get("MEGASCALE_NUM_SLICES")) > 1:
        return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Starts `jax.distributed` if this is one process of several (see the module docstring); idempotent."""
    global _started
    if _started or jax.distributed.is_initialized():
        _started = True
        return
    env = os.environ
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    kind = "explicit" if explicit else detect()
    if kind is None:
        _started = True
        log.debug("single process: jax.distributed not started")
        return

    if kind == "explicit":
        coordinator_address = coordinator_address or env.get("JAXREASON_COORDINATOR")
        if num_processes is None and env.get("JAXREASON_NUM_PROCESSES"):
            num_processes = int(env["JAXREASON_NUM_PROCESSES"])
        if process_id is None and env.get("JAXREASON_PROCESS_ID"):
            process_id = int(env["JAXREASON_PROCESS_ID"])
        missing = [name for name, value in (("coordinator address (JAXREASON_COORDINATOR)", coordinator_address),
                                            ("number of processes (JAXREASON_NUM_PROCESSES)", num_processes),
                                            ("process id (JAXREASON_PROCESS_ID)", process_id)) if value is None]
        if missing:
            raise ValueError(f"multi-process start needs {', '.join(missing)}")
        if num_processes == 1:
            _started = True
            return
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    else:
        kwargs = {}  # jax's cluster detection reads the same environment
    if local_device_ids is None and kind == "slurm" and not env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = _whole_node_gpus(env)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    if _cpu_only() and not jax.config.jax_cpu_collectives_implementation:
        # Cross-process collectives on CPU need an implementation; gloo is jax 0.10's default, keep it on.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # jax found no cluster: say which environment made us look for one
        if kind == "explicit":
            raise
        raise ValueError(f"{_WHY[kind]}, but jax.distributed.initialize() could not start: {e} "
                         "(set JAXREASON_DISTRIBUTED=off for a single process)") from e
    _started = True
    log.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices (%s)",
        kind, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.default_backend(),
    )


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and exported models. Call after `initialize()`
    (asking jax for the process index starts its backend, after which jax.distributed cannot start)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process has called `sync(name)` (the same name everywhere); nothing in a one-process
    job. Where process 0 writes a file the others then read, or all of them check a folder before it writes.

    The wait is at the coordination service (`wait_at_barrier`, `BARRIER_TIMEOUT_S`), not a device collective:
    XLA's CPU collectives (gloo) give a peer only 30 s to join, which a process still busy with a long search or
    compilation can exceed; the coordinator waits as long as it takes, and its heartbeats still notice a peer
    that died."""
    global _barriers
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        _barriers += 1  # every process calls sync in the same order, so the ids agree
        jax_distributed.global_state.client.wait_at_barrier(f"jaxreason/{_barriers}/{name}",
                                                             timeout_in_ms=BARRIER_TIMEOUT_S * 1000)


def addressable(tree):
    """`tree` with every jax.Array readable whole on this process: arrays split over the devices of several
    processes are gathered to replicated ones (a collective: call it on every process, then let one write).
    Arrays already whole on each process (one process, or replicated) stay as they are."""
    leaves = jax.tree.leaves(tree)
    split = [isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated for x in leaves]
    if not any(split):
        return tree
    # Every process first finishes what it computes (a search splits its rows over the processes without a
    # collective, and one can be minutes behind the other), so the gather's collective starts everywhere at once.
    jax.block_until_ready([x for x, s in zip(leaves, split) if s])
    sync("addressable")
    shardings = [x.sharding for x, s in zip(leaves, split) if s]
    meshes = {x.mesh for x in shardings if isinstance(x, jax.sharding.NamedSharding)}
    if len(meshes) != 1 or not all(isinstance(x, jax.sharding.NamedSharding) for x in shardings):
        raise ValueError("addressable: arrays split over several processes must share one mesh (NamedSharding)")
    whole = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec())
    gathered = iter(jax.jit(lambda xs: xs, out_shardings=whole)([x for x, s in zip(leaves, split) if s]))
    return jax.tree.unflatten(jax.tree.structure(tree), [next(gathered) if s else x for x, s in zip(leaves, split)])


def addressable_model(model):
    """`model`, or a copy of it whose weights are readable whole on this process (`addressable`): call it on
    every process before one of them saves the model."""
    graphdef, state = nnx.split(model)
    gathered = addressable(state)
    return model if gathered is state else nnx.merge(graphdef, gathered)


_WHY = {
    "auto": "JAXREASON_DISTRIBUTED=auto",
    "slurm": "a SLURM job with SLURM_NTASKS > 1 (run it under srun)",
    "tpu": "a multi-host TPU (TPU_WORKER_HOSTNAMES / MEGASCALE_*)",
}


def _whole_node_gpus(env) -> list[int] | None:
    """All of this node's GPUs when SLURM runs one task per node (else None: jax's one GPU per task)."""
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0]
    gpus = _int(env.get("SLURM_GPUS_ON_NODE"))
    if per_node == "1" and gpus > 0:
        return list(range(gpus))
    return None


def _cpu_only() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().lower() == "cpu"


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0
