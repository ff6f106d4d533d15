"""Two real processes of one jax.distributed job on this machine (127.0.0.1, 4 fake CPU devices each, one 8-device
mesh over both), started while this process runs its reference; not collected. `run_two_processes` starts any
worker (tests/distributed_worker.py, tests/train_worker.py); `train_in_two_processes` runs `jaxreason train ARGS`
in tests/train_worker.py; `structure` is what such a run shares with the one-process run."""

from __future__ import annotations

import fcntl
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

WORKER = Path(__file__).parent / "train_worker.py"
# The environment of a cluster job, which a worker must not see (it would start jax.distributed from it).
CLUSTER_VARS = re.compile(r"^(SLURM_|TPU_|MEGASCALE_|JAXREASON_|JAX_LOCAL_DEVICE_IDS$|JAX_COORDINATOR)")
T = TypeVar("T")


def free_port() -> int:
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


def worker_env() -> dict[str, str]:
    """This environment without a cluster's variables, with 4 fake CPU devices per process."""
    env = {k: v for k, v in os.environ.items() if not CLUSTER_VARS.match(k)}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_two_processes(logs_dir: Path, command: Callable[[int, int], list[str]], reference: Callable[[], T], *,
                      timeout_s: float, env: dict[str, str], cwd: Path | str) -> tuple[T, list[str]]:
    """Starts `command(process_id, port)` as processes 0 and 1, calls `reference()` here while they run, and waits
    for both; one that fails ends the wait at once (its peer would wait for it until jax's timeout). Fails with
    both processes' output when either exits non-zero or they outlast `timeout_s`. Returns `reference()`'s
    result and each process's stdout.

    One such job runs on the machine at a time (a file lock shared by pytest's workers): gloo gives a process 30 s
    to join a collective's context, which two jobs side by side on a small CPU can exceed."""
    with open(Path(tempfile.gettempdir()) / "jaxreason-two-processes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _run(logs_dir, command, reference, timeout_s, env, cwd)


def _run(logs_dir, command, reference, timeout_s, env, cwd):
    port = free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            out, err = open(logs_dir / f"out{i}", "w+"), open(logs_dir / f"err{i}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(command(i, port), stdout=out, stderr=err, env=env, cwd=cwd))
        result = reference()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"two-process run did not finish in {timeout_s} s:\n{_tails(logs)}")
            time.sleep(0.2)
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
    return result, outputs


def train_in_two_processes(logs_dir: Path, args: list[str], reference: Callable[[], object],
                           timeout_s: float = 600) -> list[str]:
    """`jaxreason train ARGS` as a two-process job (`run_two_processes`) beside `reference()`; each process's
    stdout."""
    _, outputs = run_two_processes(
        logs_dir, lambda i, port: [sys.executable, str(WORKER), str(i), str(port), "train", *args], reference,
        timeout_s=timeout_s, env={**worker_env(), "TQDM_DISABLE": "1"}, cwd=os.getcwd())
    return outputs


def structure(metrics):
    """The metrics' structure: nested keys and list lengths, every number replaced by its type (wall times left
    out), which a two-process run shares with the one-process run even where its floats differ."""
    if isinstance(metrics, dict):
        return {k: structure(v) for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [structure(v) for v in metrics]
    return type(metrics).__name__


def run_worker(main: Callable[[], None]) -> None:
    """A worker's `main()`; an exception prints its traceback and ends the process at once, where a normal exit
    would first wait minutes at jax.distributed's shutdown barrier for the peer (then the traceback is not the
    last thing in the log)."""
    try:
        main()
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


NOISE = re.compile(r"^(\[Gloo\]|\s+@\s+0x)")  # gloo's connection chatter, native stack frames


def _tails(logs) -> str:
    text = []
    for i, (out, err) in enumerate(logs):
        for name, f in (("stdout", out), ("stderr", err)):
            f.seek(0)
            lines = [line for line in f.read().splitlines() if not NOISE.match(line)]
            text.append(f"--- process {i} {name} ---\n" + "\n".join(lines[-30:]))
    return "\n".join(text)
