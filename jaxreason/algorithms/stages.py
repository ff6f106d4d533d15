"""The stage log of a multi-stage run: which stages finished and what they returned, for `--resume`.

`run_dir/stages.json` maps each finished stage's name to its JSON result; it is replaced atomically after
every stage, so a run killed at any moment resumes at the first unfinished stage. Training stages also
checkpoint inside themselves (orbax), so they resume mid-stage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from jaxreason.algorithms.registry import RunInterrupted
from jaxreason.data.batching import shuffled_batches
from jaxreason.train.fit import FitConfig, fit

log = logging.getLogger(__name__)


class StageLog:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "stages.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, name: str) -> bool:
        return name in self.results

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn()`'s result, from the log when the stage already finished."""
        if name in self.results:
            log.info("stage %s: finished in an earlier run", name)
            return self.results[name]
        log.info("stage %s", name)
        result = fn()
        self.results[name] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return result

    def train(self, name: str, model, objective, examples: Sequence, config: FitConfig,
              make_batch: Callable[[list], dict], *, mesh, seed: int, trainable=nnx.Param) -> None:
        """Fits `model` in place on `examples` (shuffled batches of `make_batch(list of examples)`) as stage
        `name`, checkpointed in `run_dir/name`, and logs the stage's steps and last loss; `trainable` selects the
        variables trained (`nnx.Param`; `LoRAParam` for adapters only). A stage stopped by SIGTERM raises
        RunInterrupted after its checkpoint."""
        if not examples:
            log.warning("stage %s: no training examples; the model stays as it is", name)
            self.run(name, lambda: {"steps": 0, "examples": 0, "final_loss": None})
            return
        config = config.for_examples(len(examples))
        batches = shuffled_batches(lambda idx: make_batch([examples[i] for i in idx]), len(examples),
                                   config.batch_size, seed)
        result = fit(model, objective, batches, config, mesh=mesh, directory=self.path.parent / name, seed=seed,
                     description=name, trainable=trainable)
        if result.interrupted:
            raise RunInterrupted(f"stage {name} stopped by SIGTERM at step {result.step} (checkpoint saved)")
        self.run(name, lambda: {"steps": result.step, "examples": len(examples),
                                "final_loss": result.history[-1]["loss"] if result.history else None})


def open_run_dir(path: str | Path, config: dict, resume: bool, *, marker: str = "stages.json") -> Path:
    """The run folder, made if new. A folder that holds a run (`marker` exists in it) needs `resume`, and a
    resumed run must have the config it started with (saved as config.json)."""
    run_dir = Path(path)
    if (run_dir / marker).exists() and not resume:
        raise ValueError(f"{run_dir} holds a run already: pass --resume to continue it, or set run_dir=NEW")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    as_json = json.loads(json.dumps(config))
    if resume and saved.exists() and json.loads(saved.read_text()) != as_json:
        raise ValueError(f"{saved}: the run was started with a different config; resume it with the same one")
    saved.write_text(json.dumps(as_json, indent=2))
    return run_dir
