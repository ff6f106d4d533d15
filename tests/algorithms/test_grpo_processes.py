"""GRPO in a multi-process job: the shortened run of tests/algorithms/test_grpo.py as two real processes
(`jaxreason train` in tests/train_worker.py, 4 fake CPU devices each, one 8-device mesh over both, gloo
collectives) into one run folder, against the same run in this process on its 8 devices.

As for ReST-MCTS* (test_rest_mcts_processes.py), not float for float: gloo sums the gradients across the
processes in another order than XLA does inside one, so the SFT losses agree closely at first and the samples
of the trained policy may then differ. The steps, the records' keys, the exported policy and the first SFT
losses (rtol 1e-5) are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_distributed import _free_port, _tails, _worker_env
from test_grpo import CONFIG, SHORT, _config

from jaxreason.algorithms.grpo import run_grpo

WORKER = Path(__file__).parents[1] / "train_worker.py"
TIMEOUT_S = 600


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8
    port = _free_port()
    run_dir = tmp_path / "two"
    procs, logs = [], []
    try:
        for i in range(2):
            out, err = open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(port), "train", "--config", CONFIG, *SHORT,
                 f"run_dir={run_dir}"], stdout=out, stderr=err, env={**_worker_env(), "TQDM_DISABLE": "1"},
                cwd=os.getcwd()))
        # The single-process reference runs here while the two processes run.
        run_grpo(_config(tmp_path / "one"))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"two-process run did not finish in {TIMEOUT_S} s:\n{_tails(logs)}")
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], _tails(logs)

    one, two = tmp_path / "one", run_dir
    written = {p.name for p in two.iterdir()}
    assert {"config.json", "stages.json", "metrics.json", "report.md", "models"} <= written
    assert not [name for name in written if name.endswith(".tmp")]
    assert (two / "models" / "policy" / "config.json").exists()
    history = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert _keys(history[1]) == _keys(history[0])
    losses = [[json.loads(line)["loss"] for line in (d / "sft" / "sft_metrics.jsonl").read_text().splitlines()]
              for d in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 100
    np.testing.assert_allclose(losses[1][:20], losses[0][:20], rtol=1e-5)


def _keys(metrics):
    """The metrics' structure: nested keys and list lengths, every number replaced by its type."""
    if isinstance(metrics, dict):
        return {k: _keys(v) for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [_keys(v) for v in metrics]
    return type(metrics).__name__
