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
