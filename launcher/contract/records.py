"""Reading example files (JSONL, CSV) record by record; shared by validation and the trainers."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError


def iter_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL or CSV file; bad JSON names its line."""
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found", file=path, expected="a JSONL or CSV file of examples")
    if p.suffix.lower() == ".csv":
        try:
            with open(p, newline="", encoding="utf-8") as f:
                yield from enumerate(csv.DictReader(f), 2)
        except UnicodeDecodeError:
            raise _not_utf8(path, _first_bad_line(p)) from None
        return
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, n) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} is not valid JSON ({e.msg})", file=path) from None
            if not isinstance(rec, dict):
                raise UserError(f"line {n} is not a JSON object", file=path)
            yield n, rec


def _first_bad_line(p: Path) -> int:
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 0


def _not_utf8(path: str, line: int) -> UserError:
    return UserError(f"line {line} is not UTF-8 text", file=path,
                     expected="a UTF-8 file (convert it, e.g. iconv -f latin1 -t utf-8)")
