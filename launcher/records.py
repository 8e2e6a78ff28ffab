"""Reading example files (JSONL, CSV) record by record; shared by validation and the trainers."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from hpctrain.launcher.errors import UserError


def iter_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL or CSV file; bad JSON names its line."""
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found", file=path, expected="a JSONL or CSV file of examples")
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), 2)
        return
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} is not valid JSON ({e.msg})", file=path) from None
            if not isinstance(rec, dict):
                raise UserError(f"line {n} is not a JSON object", file=path)
            yield n, rec
