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

from hpctrain.launcher.contract.rundir import RunDir


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
        self._file = open(RunDir(run_dir).metrics, "a") if enabled else None  # noqa: SIM115

    def log(self, record: dict, to_sinks: bool = True) -> None:
        """A record to metrics.jsonl and (unless `to_sinks` is False) to every sink."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks if to_sinks else ():
            sink.log(record)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """Rows of a table (GRPO's sample completions) to every sink that shows tables (W&B)."""
        if not self.enabled:
            return
        for sink in self.sinks:
            if hasattr(sink, "table"):
                sink.table(step, name, rows)

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


# Dense peak TFLOP/s per GPU (vendor datasheets; bf16 with bf16 training, TF32 otherwise),
# matched against torch.cuda.get_device_name(); override with monitor.peak_tflops.
PEAK_TFLOPS = {  # name fragment: (bf16, tf32)
    "H200": (989.0, 494.0), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0),
    "A100": (312.0, 156.0), "L40S": (362.0, 183.0), "L4": (121.0, 60.0), "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
}


def device_peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The peak the MFU is a fraction of (None on CPU or an unknown GPU: FLOP/s only)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, tf32) in PEAK_TFLOPS.items():
        if fragment in name:
            return bf16 if precision == "bf16" else tf32
    return None


class Throughput:
    """Averages over the steps since the last `window()` call (the logged window)."""

    def __init__(self, flops_per_token: float | None, world_size: int, peak_tflops: float | None) -> None:
        self.flops_per_token, self.world, self.peak = flops_per_token, world_size, peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.steps, self.seconds, self.data_seconds, self.samples, self.tokens = 0, 0.0, 0.0, 0, 0

    def tick(self, step_seconds: float, data_seconds: float, samples: int, tokens: int) -> None:
        self.steps += 1
        self.seconds += step_seconds
        self.data_seconds += data_seconds
        self.samples += samples
        self.tokens += tokens

    def window(self) -> dict:
        if not self.steps or self.seconds <= 0:
            return {}
        tok_s = self.tokens / self.seconds
        out = {"step_time_s": self.seconds / self.steps, "data_wait_s": self.data_seconds / self.steps,
               "samples_per_s": self.samples / self.seconds, "tokens_per_s": tok_s}
        if self.flops_per_token:
            per_device = self.flops_per_token * tok_s / self.world / 1e12
            out["tflops_per_device"] = per_device  # achieved (model FLOPs, torchtitan's count)
            if self.peak:
                out["mfu"] = per_device / self.peak
        self._reset()
        return out
