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

import jax
import numpy as np
from test_grpo import CONFIG, SHORT, _config
from two_processes import structure, train_in_two_processes

from jaxreason.algorithms.grpo import run_grpo

TIMEOUT_S = 600


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8
    run_dir = tmp_path / "two"
    # The single-process reference runs here while the two processes run.
    train_in_two_processes(tmp_path, ["--config", CONFIG, *SHORT, f"run_dir={run_dir}"],
                           lambda: run_grpo(_config(tmp_path / "one")), TIMEOUT_S)

    one, two = tmp_path / "one", run_dir
    written = {p.name for p in two.iterdir()}
    assert {"config.json", "stages.json", "metrics.json", "report.md", "models"} <= written
    assert not [name for name in written if name.endswith(".tmp")]
    assert (two / "models" / "policy" / "config.json").exists()
    history = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert structure(history[1]) == structure(history[0])
    losses = [[json.loads(line)["loss"] for line in (d / "sft" / "sft_metrics.jsonl").read_text().splitlines()]
              for d in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 100
    np.testing.assert_allclose(losses[1][:20], losses[0][:20], rtol=1e-5)

