"""Reading example files (JSONL, CSV, TSV) record by record; shared by validation and the trainers."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError


def iter_records(path: str, tsv_columns: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL, CSV (a header row) or TSV file (no header: its columns
    are `tsv_columns`, the kind's); bad JSON, or a TSV row without every column, names its line."""
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found", file=path, expected="a JSONL or CSV file of examples")
    if p.suffix.lower() == ".tsv":
        yield from _tsv_records(p, path, tsv_columns)
        return
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


def _tsv_records(p: Path, path: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    if not columns:
        raise UserError("a TSV file, which this kind does not read", file=path,
                        expected="JSONL or CSV (TSV: kind seq2seq, source<TAB>target)")
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise _not_utf8(path, n) from None
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(columns):
                raise UserError(f"line {n} has {len(cells)} tab-separated column(s)", file=path,
                                expected=f"{len(columns)} columns: {', '.join(columns)} (no header row)")
            yield n, dict(zip(columns, cells, strict=True))


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
