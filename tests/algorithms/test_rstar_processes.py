"""rStar in a multi-process job: the shortened run of tests/algorithms/test_rstar.py as two real processes
(`tests/two_processes.py`) into one run folder, against the same run in this process on its 8 devices. rStar
trains nothing and each problem's tree draws from its own key, so the two runs agree exactly: the same trees'
trajectories, verdicts, answers and metrics."""

from __future__ import annotations

import json

import jax
import tiny
from test_rstar import CONFIG, _args
from tiny import TOKENIZER
from two_processes import train_in_two_processes

from jaxreason.cli import main
from jaxreason.models.pretrained import save_pretrained


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8
    folder = str(save_pretrained(tiny.policy(seed=3), TOKENIZER, tmp_path / "model"))
    two = tmp_path / "two"
    train_in_two_processes(tmp_path, ["--config", CONFIG, *_args(folder, two)],
                           lambda: main(["train", "--config", CONFIG, *_args(folder, tmp_path / "one")]))
    one = tmp_path / "one"
    written = {p.name for p in two.iterdir()}
    assert {"config.json", "stages.json", "metrics.json", "results.json", "report.md"} <= written
    stages = [json.loads((d / "stages.json").read_text()) for d in (one, two)]
    for s in stages:
        s["generator"].pop("seconds")
    assert stages[1] == stages[0]
    results = [json.loads((d / "results.json").read_text()) for d in (one, two)]
    assert results[1] == results[0]
