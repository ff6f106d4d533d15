"""Runs `jaxreason train ARGS` as a two-process jax.distributed job (tests/train_worker.py, 4 fake CPU devices
each, one 8-device mesh over both) while this process runs its reference, and compares what the two runs share;
not collected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_distributed import _free_port, _tails, _worker_env

WORKER = Path(__file__).parent / "train_worker.py"


def train_in_two_processes(logs_dir: Path, args: list[str], reference: Callable[[], object],
                           timeout_s: float = 600) -> list[str]:
    """Starts both processes on `args`, calls `reference()` here while they run, and fails with both processes'
    output when either exits non-zero or they outlast `timeout_s`; returns each process's stdout."""
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            out, err = open(logs_dir / f"out{i}", "w+"), open(logs_dir / f"err{i}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), "train", *args],
                                          stdout=out, stderr=err, env={**_worker_env(), "TQDM_DISABLE": "1"},
                                          cwd=os.getcwd()))
        reference()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"two-process run did not finish in {timeout_s} s:\n{_tails(logs)}")
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], _tails(logs)
    outputs = []
    for out, _ in logs:
        out.seek(0)
        outputs.append(out.read())
    return outputs


def structure(metrics):
    """The metrics' structure: nested keys and list lengths, every number replaced by its type (wall times left
    out), which a two-process run shares with the one-process run even where its floats differ."""
    if isinstance(metrics, dict):
        return {k: structure(v) for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [structure(v) for v in metrics]
    return type(metrics).__name__
