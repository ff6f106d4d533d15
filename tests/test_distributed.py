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
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from two_processes import CLUSTER_VARS, run_two_processes, worker_env

from jaxreason import distributed

HERE = Path(__file__).parent
TIMEOUT_S = 180


# ---- detection: which environment starts jax.distributed, and with what arguments ----------------------



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

def _load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8
    worker = _load_worker()
    # The single-process reference runs here while the workers start and compile.
    reference, printed = run_two_processes(
        tmp_path, lambda i, port: [sys.executable, str(HERE / "distributed_worker.py"), str(i), str(port)],
        lambda: {"x".join(map(str, shape)): worker.train(shape) for shape in worker.MESH_SHAPES},
        timeout_s=TIMEOUT_S, env=worker_env(), cwd=HERE.parent)
    weights = {shape: w for shape, (_, w) in reference.items()}
    reference = {shape: losses for shape, (losses, _) in reference.items()}

    results = [json.loads(out.strip().splitlines()[-1]) for out in printed]
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



def test_a_late_peer_is_waited_for(tmp_path):
    """Process 1 reaches `addressable`'s gather 40 s after process 0, past gloo's 30 s to join a collective."""
    _, printed = run_two_processes(
        tmp_path, lambda i, port: [sys.executable, str(HERE / "distributed_worker.py"), str(i), str(port),
                                   "--late", "40"],
        lambda: None, timeout_s=TIMEOUT_S, env=worker_env(), cwd=HERE.parent)
    assert [json.loads(out.strip().splitlines()[-1]) for out in printed] == [{"sum": 496.0}] * 2
