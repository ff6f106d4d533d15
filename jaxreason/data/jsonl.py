"""JSON Lines input: records with required string fields; every error names the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_records(path: str | Path, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line, each record an object with string `fields`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file does not exist: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            for name in fields:
                if name not in record:
                    raise ValueError(f"{path}:{number}: missing field {name!r}")
                if not isinstance(record[name], str):
                    raise ValueError(f"{path}:{number}: field {name!r} must be a string")
            yield number, record
