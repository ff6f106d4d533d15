"""Multi-host start: environment detection (jax.distributed.initialize mocked), and a real two-process run.

The two-process test starts tests/distributed_worker.py twice on 127.0.0.1, each process with 4 fake CPU
devices, so that the sharded SFT step runs on a global 8-device mesh across processes (gloo collectives);
its losses and its trained weights (gathered whole on each process) must equal the same step's in this one
process on its 8 devices (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxreason import distributed

HERE = Path(__file__).parent
TIMEOUT_S = 180


# ---- detection: which environment starts jax.distributed, and with what arguments ----------------------

CLUSTER_VARS = re.compile(r"^(SLURM_|TPU_|MEGASCALE_|JAXREASON_|JAX_LOCAL_DEVICE_IDS$|JAX_COORDINATOR)")


@pytest.fixture
def fake_init(monkeypatch):
    """A clean environment and a recording stand-in for jax.distributed.initialize."""
    for name in list(os.environ):
        if CLUSTER_VARS.match(name):
            monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_started", False)
    return calls


def test_single_process_does_nothing(fake_init):
    distributed.initialize()
    assert fake_init == []
    assert distributed.is_main_process()


def test_environment_variables(fake_init, monkeypatch):
    monkeypatch.setenv("JAXREASON_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXREASON_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXREASON_PROCESS_ID", "2")
    distributed.initialize()
    assert fake_init == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)]


def test_arguments_win_over_environment(fake_init, monkeypatch):
    monkeypatch.setenv("JAXREASON_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXREASON_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXREASON_PROCESS_ID", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    distributed.initialize("host:99", process_id=0, local_device_ids=[0, 1])
    assert fake_init == [dict(coordinator_address="host:99", num_processes=4, process_id=0, local_device_ids=[0, 1])]


def test_second_call_is_a_no_op(fake_init, monkeypatch):
    distributed.initialize("host:99", 2, 0)
    distributed.initialize("host:99", 2, 0)
    assert len(fake_init) == 1


def test_incomplete_explicit_settings_are_an_error(fake_init, monkeypatch):
    monkeypatch.setenv("JAXREASON_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="JAXREASON_NUM_PROCESSES.*JAXREASON_PROCESS_ID"):
        distributed.initialize()
    assert fake_init == []


def test_one_explicit_process_does_nothing(fake_init):
    distributed.initialize("host:99", 1, 0)
    assert fake_init == []


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, {}),  # jax's SlurmCluster reads SLURM_* itself
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # a one-task job (or an interactive shell)
    # one task per node with the node's GPUs: all of them, not jax's one GPU per local rank
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"},
     {"local_device_ids": [0, 1, 2, 3]}),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "2"},
     {"local_device_ids": [0, 1]}),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4"}, {}),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4",
      "JAX_LOCAL_DEVICE_IDS": "0,1"}, {}),  # jax reads JAX_LOCAL_DEVICE_IDS itself
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}),  # GKE multi-host TPU slice
    ({"TPU_WORKER_HOSTNAMES": "t1"}, None),  # a single TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "t1", "MEGASCALE_NUM_SLICES": "2"}, {}),  # multislice
    ({"JAXREASON_DISTRIBUTED": "auto"}, {}),  # a GCE TPU pod: jax asks the metadata server
    ({"JAXREASON_DISTRIBUTED": "off", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),
])
def test_cluster_detection(fake_init, monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    distributed.initialize()
    assert fake_init == ([] if expected is None else [expected])


def test_undetectable_cluster_names_the_environment(fake_init, monkeypatch):
    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # the batch step itself, outside srun
    with pytest.raises(ValueError, match="SLURM.*srun.*coordinator_address.*JAXREASON_DISTRIBUTED=off"):
        distributed.initialize()


# ---- two real processes on one machine --------------------------------------------------------------------

def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), which the processes' own connections draw from."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not CLUSTER_VARS.match(k)}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8
    worker = _load_worker()
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            out, err = open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(i), str(port)],
                                          stdout=out, stderr=err, env=_worker_env(), cwd=HERE.parent))
        # The single-process reference runs here while the workers start and compile.
        reference = {"x".join(map(str, shape)): worker.train(shape) for shape in worker.MESH_SHAPES}
        weights = {shape: w for shape, (_, w) in reference.items()}
        reference = {shape: losses for shape, (losses, _) in reference.items()}
        # Wait for both; one that fails ends the run at once (its peer would wait for it until jax's timeout).
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"two-process run did not finish in {TIMEOUT_S} s:\n{_tails(logs)}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], _tails(logs)

    results = []
    for out, _ in logs:
        out.seek(0)
        results.append(json.loads(out.read().strip().splitlines()[-1]))
    assert [r["process"] for r in results] == [0, 1]
    assert [r["main"] for r in results] == [True, False]
    assert all(r["devices"] == 8 for r in results)
    for r in results:
        assert r["losses"].keys() == reference.keys()
        for shape, losses in r["losses"].items():
            np.testing.assert_allclose(losses, reference[shape], rtol=1e-5, err_msg=f"mesh {shape}")
        np.testing.assert_allclose([r["weights"][s] for s in weights], list(weights.values()), rtol=1e-5)
    first = reference[next(iter(reference))]
    assert first[0][0] != first[1][0]  # the first update really changed the model


def _tails(logs) -> str:
    text = []
    for i, (out, err) in enumerate(logs):
        for name, f in (("stdout", out), ("stderr", err)):
            f.seek(0)
            lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
            text.append(f"--- process {i} {name} ---\n" + "\n".join(lines[-30:]))
    return "\n".join(text)
