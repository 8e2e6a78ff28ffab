"""Metrics: a progress line on stdout and metrics.jsonl; trackers (W&B) plug in as sinks."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from hpctrain.launcher.rundir import mark_failed


def user_error_exit(error: Exception, run_dir: str | Path | None) -> int:
    """Report a user mistake from a trainer process; returns its exit code.

    Under torchrun a non-zero exit buries the message under torchrun's own traceback,
    so a trainer there exits 0 after recording `user_error` in status.json; the
    launcher reads it and exits 2. Run directly, the trainer exits 2 itself.
    """
    print(f"hpctrain: error: {error}", file=sys.stderr)
    if run_dir and os.environ.get("RANK", "0") == "0":
        mark_failed(run_dir, str(error), user_error=True)
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else 2


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Monitor:
    """Rank 0 writes; other ranks hold a silent monitor. `sinks` get every record (W&B later)."""

    def __init__(
        self, run_dir: Path, enabled: bool, sinks: list | None = None, echo_to_log: bool = False
    ) -> None:
        self.enabled = enabled
        self.echo_to_log = echo_to_log  # stdout is the console only: copy lines to the rank log
        self.sinks = sinks or []
        self._file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def log(self, record: dict, to_sinks: bool = True) -> None:
        """A record to metrics.jsonl and (unless `to_sinks` is False) to every sink."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks if to_sinks else ():
            sink.log(record)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True, file=sys.stdout)
            if self.echo_to_log:
                print(text, flush=True, file=sys.stderr)

    def close(self, preempted: bool = False) -> None:
        for sink in self.sinks:
            sink.close(preempted=preempted)
        self.sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """This rank's peak memory: CUDA's max allocated on a GPU; on CPU the resident set's
    high-water mark (ru_maxrss), with the resident set at construction (after the imports,
    before the model) as the baseline that `hpctrain plan`'s estimate is compared with."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base_mib = 0.0 if self.cuda else _rss_bytes() / 2**20

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
