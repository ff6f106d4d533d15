"""A finished ReST-MCTS* run read back for the benchmarks that re-measure its models: its config and held-out
problems."""

from __future__ import annotations

import json
from pathlib import Path

from jaxreason.algorithms.rest_mcts import RestMCTSConfig
from jaxreason.config import from_dict
from jaxreason.tasks.base import Problem, Task


def held_out(run_dir: Path, count: int) -> tuple[RestMCTSConfig, Task, list[Problem]]:
    """The run's config (from its config.json), its task and its first `count` held-out problems."""
    raw = json.loads((run_dir / "config.json").read_text())
    raw.pop("algorithm", None)
    config = from_dict(RestMCTSConfig, raw, str(run_dir / "config.json"))
    task = config.problems.task.build()
    return config, task, task.problems("test", n=config.problems.test, seed=config.seed)[:count]
