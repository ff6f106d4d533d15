"""The per-step records of an RL run (GRPO, SCoRe), saved atomically beside its checkpoints.

The history is saved before each checkpoint, so a checkpoint is never ahead of the history it resumes; records
written after the checkpoint a run resumes from are dropped (`truncate`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class StepHistory:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def truncate(self, step: int) -> None:
        """Drops the records after `step` (written before a crash, but not in the checkpoint resumed)."""
        self.rows = [r for r in self.rows if r["step"] <= step]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def evaluations(self) -> list[dict]:
        return [r for r in self.rows if "eval" in r]

    def generated_tokens(self) -> int:
        return self.rows[-1]["generated_tokens"] if self.rows else 0

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows))
        os.replace(tmp, self.path)
