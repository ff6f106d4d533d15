"""The stage log of a multi-stage run: which stages finished and what they returned, for `--resume`.

`run_dir/stages.json` maps each finished stage's name to its JSON result; it is replaced atomically after
every stage, so a run killed at any moment resumes at the first unfinished stage. Training stages also
checkpoint inside themselves (orbax), so they resume mid-stage, and keep only their weights once finished.
In a multi-process job every process runs every stage and holds its result; process 0 alone writes the log.
`export_models` writes a run's final models the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from jaxreason.algorithms.registry import RunInterrupted
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_store import TooLongError
from jaxreason.distributed import addressable_model, is_main_process, sync
from jaxreason.models.pretrained import save_pretrained, save_value_model
from jaxreason.train.checkpoint import restore_weights, save_weights
from jaxreason.train.fit import FitConfig, fit

log = logging.getLogger(__name__)
WEIGHTS = "weights"  # a finished training stage's weights, in its folder


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
        if is_main_process():  # every process holds the results; one writes them
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            with open(tmp) as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return result

    def train(self, name: str, model, objective, examples: Sequence, config: FitConfig,
              make_batch: Callable[[list], dict], *, mesh, seed: int, trainable=nnx.Param) -> None:
        """Fits `model` in place on `examples` (shuffled batches of `make_batch(list of examples)`) as stage
        `name`, checkpointed in `run_dir/name/checkpoints`, and logs the stage's steps and last loss; `trainable`
        selects the variables trained (`nnx.Param`; `LoRAParam` for adapters only). A stage stopped by SIGTERM
        raises RunInterrupted after its checkpoint.

        A finished stage keeps its weights in `run_dir/name/weights` (written before the stage is logged, so a
        logged stage always has them) and drops its checkpoints, optimizer state and all, unless
        `config.keep_optimizer`; a resumed run loads a finished stage's weights into `model`."""
        directory = self.path.parent / name
        if name in self and (directory / WEIGHTS).exists():
            log.info("stage %s: finished in an earlier run; loading its weights", name)
            nnx.update(model, restore_weights(directory / WEIGHTS, nnx.state(model)))
            return
        examples, dropped = _fitting(name, examples, make_batch, config)
        if not examples:
            log.warning("stage %s: no training examples; the model stays as it is", name)
            self.run(name, lambda: {"steps": 0, "examples": 0, "final_loss": None, "dropped_overlong": dropped})
            return
        config = config.for_examples(len(examples))
        batches = shuffled_batches(lambda idx: make_batch([examples[i] for i in idx]), len(examples),
                                   config.batch_size, seed)
        result = fit(model, objective, batches, config, mesh=mesh, directory=directory, seed=seed,
                     description=name, trainable=trainable)
        if result.interrupted:
            raise RunInterrupted(f"stage {name} stopped by SIGTERM at step {result.step} (checkpoint saved)")
        save_weights(directory / WEIGHTS, nnx.state(model))
        self.run(name, lambda: {"steps": result.step, "examples": len(examples), "dropped_overlong": dropped,
                                "final_loss": result.history[-1]["loss"] if result.history else None})
        if not config.keep_optimizer and is_main_process():
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)


def _fitting(name: str, examples: Sequence, make_batch: Callable[[list], dict], config: FitConfig,
             chunk: int = 256) -> tuple[list, int]:
    """The examples whose batch rows fit `config.max_len` (`make_batch` raises `TooLongError` for the others),
    and how many were dropped; with `config.overlong = "error"` a too-long example is an error naming the
    stage."""
    kept = []
    for start in range(0, len(examples), chunk):
        part = list(examples[start:start + chunk])
        while part:  # again after a drop: a batch of two sides (pairs) reports one side at a time
            try:
                make_batch(part)
                break
            except TooLongError as e:
                if config.overlong == "error":
                    raise ValueError(f"stage {name}: {e}") from None
                too_long = set(e.rows)
                part = [x for i, x in enumerate(part) if i not in too_long]
        kept += part
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning("stage %s: %d of %d examples longer than max_len = %d left out (raise max_len to keep them)",
                    name, dropped, len(examples), config.max_len)
    return kept, dropped


def open_run_dir(path: str | Path, config: dict, resume: bool, *, marker: str = "stages.json") -> Path:
    """The run folder, made if new. A folder that holds a run (`marker` exists in it) needs `resume`, and a
    resumed run must have the config it started with (saved as config.json).

    In a multi-process job every process calls it with the same folder (one shared file system): all check
    it, then process 0 alone makes it and writes config.json, and every process returns once it exists."""
    run_dir = Path(path)
    if (run_dir / marker).exists() and not resume:
        raise ValueError(f"{run_dir} holds a run already: pass --resume to continue it, or set run_dir=NEW")
    saved = run_dir / "config.json"
    as_json = json.loads(json.dumps(config))
    if resume and saved.exists() and json.loads(saved.read_text()) != as_json:
        raise ValueError(f"{saved}: the run was started with a different config; resume it with the same one")
    sync("jaxreason:open_run_dir:checked")  # no process checks the folder after process 0 has written to it
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(as_json, indent=2))
    sync("jaxreason:open_run_dir:made")
    return run_dir


def export_models(run_dir: Path, tokenizer, models: dict[str, nnx.Module | None],
                  value_models: dict[str, nnx.Module | None] | None = None) -> None:
    """`models` (`save_pretrained`) and `value_models` (`save_value_model`) as Hugging Face folders
    `run_dir/models/<name>`; a None entry is skipped, and an existing folder stays (an earlier run of the same
    stages wrote it). Every process gathers the weights, which may be split over the processes
    (`addressable_model`, a collective); process 0 writes."""
    saves = [(name, model, save_pretrained) for name, model in models.items()]
    saves += [(name, model, save_value_model) for name, model in (value_models or {}).items()]
    missing = [(run_dir / "models" / name, model, save) for name, model, save in saves
               if model is not None and not (run_dir / "models" / name).exists()]
    sync("jaxreason:export_models")  # every process decided what is missing before process 0 writes
    for folder, model, save in missing:
        whole = addressable_model(model)
        if is_main_process():
            save(whole, folder=folder, tokenizer=tokenizer)
