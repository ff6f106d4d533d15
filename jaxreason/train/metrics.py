"""Training metrics to a JSONL file and TensorBoard event files, and a progress bar for long loops."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class MetricsLogger:
    """Appends one JSON line per logged step to `run_dir/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, name: str = "train"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / f"{name}_metrics.jsonl", "a", buffering=1)
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard" / name))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        return scalars

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def progress(total: int, initial: int = 0, description: str = "") -> tqdm:
    """A tqdm bar (to stderr) for a loop of `total` iterations, starting at `initial` when resuming."""
    return tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True, mininterval=0.5)
