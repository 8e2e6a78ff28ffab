"""Hang watchdog: a rank stuck in a collective must not burn a whole allocation silently.

Every rank runs a thread that expects a heartbeat (`beat(step)`) after each step and
around evaluation and saves. If none comes within the limit, the rank
- dumps every Python thread's stack into its rank log (faulthandler),
- writes RUN_DIR/control/hang.RANK.json: its last step and where its main thread is
  (inside torch.distributed / autograd / DeepSpeed communication = waiting in a
  collective; anywhere else = it did not arrive),
- and exits non-zero; rank 0 first waits for the others' reports and records status
  "hung" with the step and the ranks that did not arrive. The job ends failed (Slurm
  frees the nodes; a hang is not requeued as a preemption).

The limit: `monitor.hang_timeout_s`, else 10 x the median step time with a floor of
5 minutes (twice that before the first step: start-up, op builds, the first compile).
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text
from hpctrain.launcher.contract.states import mark_hung

FLOOR_S = 300.0
HUNG_EXIT = 3
COLLECTIVE_MARKS = ("torch/distributed", "torch/autograd", "deepspeed/comm", "deepspeed/runtime/zero")


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, limit_s: float | None, total: int) -> None:
        self.run_dir, self.rank, self.world, self.fixed, self.total = run_dir, rank, world_size, limit_s, total
        self.step, self.last = 0, time.monotonic()
        self.times: deque[float] = deque(maxlen=50)  # the last steps' times (the limit's median)
        self.main = threading.main_thread()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpctrain-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float:
        if self.fixed:
            return self.fixed
        if not self.times:
            return 2 * FLOOR_S
        return max(FLOOR_S, 10 * statistics.median(list(self.times)))  # a snapshot: the main thread appends

    def beat(self, step: int, step_seconds: float | None = None) -> None:
        self.step = step
        if step_seconds is not None:
            self.times.append(step_seconds)
        self.last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            if time.monotonic() - self.last > self.limit():
                self._hung()

    def _where(self) -> tuple[str, bool]:
        frame = sys._current_frames().get(self.main.ident)
        stack = traceback.extract_stack(frame) if frame is not None else []
        # the rank's own frames start where its module runs as __main__ (runpy); a rank forked from
        # torchrun's agent (trainers/warm_start.py) has the agent's frames below them
        starts = [i for i, f in enumerate(stack) if f.filename.replace("\\", "/").endswith(("/runpy.py", " runpy>"))]
        if starts:
            stack = stack[starts[-1] + 1:]
        in_collective = any(any(m in f.filename.replace("\\", "/") for m in COLLECTIVE_MARKS) for f in stack)
        ours = [f for f in stack if "/hpctrain/" in f.filename.replace("\\", "/") or "/trainers/" in f.filename]
        top = (ours or stack or [None])[-1]
        where = f"{Path(top.filename).name}:{top.lineno} in {top.name}" if top else "unknown"
        return where, in_collective

    def _hung(self) -> None:
        limit = self.limit()
        print(f"hpctrain: no step completed for {limit:.0f}s after step {self.step}: hung; stacks of every "
              "thread follow", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        where, in_collective = self._where()
        run = RunDir(self.run_dir)
        run.control.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.hang_report(self.rank), json.dumps(
            {"rank": self.rank, "step": self.step, "where": where, "in_collective": in_collective}) + "\n")
        if self.rank == 0:
            reports = self._reports(run, wait_s=15.0)
            waiting = sorted(r["rank"] for r in reports.values() if r["in_collective"])
            absent = sorted(set(range(self.world)) - set(waiting))
            detail = "; ".join(f"rank {r}: {reports[r]['where']}" if r in reports else f"rank {r}: no report"
                               for r in absent)
            reason = (f"no step completed for {limit:.0f}s after step {self.step}: ranks that did not arrive: "
                      f"{absent or 'none'} ({detail}); waiting in a collective: {waiting or 'none'}")
            mark_hung(self.run_dir, self.step, self.total, reason)
            print(f"hpctrain: hung: {reason}", file=sys.stderr, flush=True)
        else:
            time.sleep(10.0)  # let rank 0 gather the reports before torchrun ends the job
        os._exit(HUNG_EXIT)

    def _reports(self, run: RunDir, wait_s: float) -> dict[int, dict]:
        end = time.monotonic() + wait_s
        while True:
            reports = {}
            for r in range(self.world):
                try:
                    reports[r] = json.loads(run.hang_report(r).read_text())
                except (OSError, ValueError):
                    pass
            if len(reports) == self.world or time.monotonic() > end:
                return reports
            time.sleep(0.2)


def clear_reports(run_dir: Path) -> None:
    """Remove an earlier attempt's hang reports (rank 0, at start)."""
    for p in RunDir(run_dir).hang_reports():
        p.unlink(missing_ok=True)

