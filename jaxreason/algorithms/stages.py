"""The stage log of a multi-stage run: which stages finished and what they returned, for `--resume`.

`run_dir/stages.json` maps each finished stage's name to its JSON result; it is replaced atomically after
every stage, so a run killed at any moment resumes at the first unfinished stage. Training stages also
checkpoint inside themselves (orbax), so they resume mid-stage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
