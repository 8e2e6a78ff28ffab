"""Metrics: a progress line on stdout and metrics.jsonl; trackers (W&B) plug in as sinks."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Monitor:
    """Rank 0 writes; other ranks hold a silent monitor. `sinks` get every record (W&B later)."""

    def __init__(self, run_dir: Path, enabled: bool, sinks: list | None = None) -> None:
        self.enabled = enabled
        self.sinks = sinks or []
        self._file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.log(record)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True, file=sys.stdout)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
