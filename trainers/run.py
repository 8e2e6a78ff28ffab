"""One attempt of a run on one rank: console and metrics (rank 0), resume from the newest whole
checkpoint, the checkpoint cadence and the stop agreement (trainers/preemption.py), and the
state it ends in. The loop (trainers/loop.py) calls it at the start and at every step boundary.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from enum import IntEnum
from pathlib import Path

from hpctrain.launcher.contract.checkpoints import (
    CHECKPOINTS,
    CheckpointMeta,
    newest_whole_checkpoint,
    step_name,
)
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.launcher.contract.states import mark_finished, mark_preempted, mark_running
from hpctrain.trainers.cadence import Cadence, last_logged_save_s
from hpctrain.trainers.checkpoint import Checkpointer, load_checkpoint
from hpctrain.trainers.distributed import Dist, from_main_rank
from hpctrain.trainers.engines import Engine, engine_class
from hpctrain.trainers.entry import Launch
from hpctrain.trainers.monitor import Monitor, PeakMemory, Throughput, device_peak_tflops
from hpctrain.trainers.preemption import StopRequest
from hpctrain.trainers.watchdog import Watchdog, clear_reports

CRASH_SETTLE_S = 300.0  # how long a failing attempt waits for the save in flight to publish


class Found(IntEnum):
    """What rank 0 found to resume from (sent to every rank as an integer)."""

    NONE = 0  # no checkpoint: a fresh start
    WHOLE = 1  # the newest whole checkpoint
    ALL_DAMAGED = 2  # checkpoints, none whole


class Run:
    """One attempt of a run on one rank: console and metrics (rank 0), resume, the
    checkpoint cadence and the stop agreement (see trainers/preemption.py)."""

    def __init__(self, spec: RunSpec, launch: Launch, d: Dist) -> None:
        self.spec, self.launch, self.d = spec, launch, d
        self.run_dir = launch.run_dir
        self.mon = Monitor(self.run_dir, enabled=d.is_main, echo_to_log=launch.echo_to_log)
        if d.is_main and spec.monitor.wandb.mode != "disabled":
            from hpctrain.trainers.wandb_sink import WandbSink

            self.mon.sinks.append(WandbSink(spec, self.run_dir, self.mon.print))
        # one line per rank (in each rank's log) so a multi-node run shows who took part
        print(f"rank {d.rank}/{d.world_size} on node {d.node_rank} ({socket.gethostname()}), "
              f"pid {os.getpid()}", file=sys.stderr, flush=True)
        self.stopper = StopRequest(launch.stop_path or RunDir(self.run_dir).stop_file, launch.deadline,
                                   margin_s=5.0)
        self.last_save, self.save_seconds = time.time(), 0.0
        self.cadence = Cadence(spec.checkpoint, deciding=d.is_main)
        self.checkpointer = Checkpointer(self.run_dir, d.rank, spec.checkpoint.keep_last,
                                         background=spec.checkpoint.background)
        self._host_prepared = False  # Checkpointer.prepare, after the first step
        self.watchdog: Watchdog | None = None  # from `started` on
        engine_class(spec).prepare(spec, d)  # its library imported before the memory baseline is taken
        self.memory = PeakMemory(d.device)
        self.restarts = 0
        self.last_mfu: float | None = None
        self.measure(None)

    def measure(self, flops_per_token: float | None) -> None:
        """Throughput bookkeeping; with the model's FLOPs per token, achieved FLOP/s and MFU."""
        peak = device_peak_tflops(self.d.device, self.spec.training.precision, self.spec.monitor.peak_tflops)
        self.throughput = Throughput(flops_per_token, self.d.world_size, peak)

    def window_metrics(self) -> dict:
        """What a logged step adds: throughput over the window, peak memory, restarts."""
        out = self.throughput.window()
        self.last_mfu = out.get("mfu")
        return {**out, "peak_mem_mib": round(self.memory.peak_mib(), 1), "restarts": self.restarts}

    def resume(self, engine: Engine, batches) -> CheckpointMeta | None:
        """Load the newest whole checkpoint (found by scanning) into the engine, the RNGs and the
        sampler; its meta record, or None when there is none."""
        ckpt = self.whole_checkpoint()
        if ckpt is None:
            return None
        meta = load_checkpoint(ckpt, engine, self.d.rank)
        batches.load_state_dict(meta.sampler)
        self.mon.print(
            f"resuming from {ckpt} (step {meta.step}, {meta.tokens_seen:,} tokens seen, "
            f"saved by {meta.world_size} rank(s), now {self.d.world_size})"
        )
        return meta

    def whole_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files are as saved (rank 0 checks, every rank takes its
        answer): a damaged one is skipped and said; none whole is refused, naming the file."""
        found, step, skipped = Found.NONE, 0, []
        if self.d.is_main:
            ckpt, skipped = newest_whole_checkpoint(self.run_dir)
            for path, why in skipped:
                self.mon.print(f"checkpoint {path.name} is damaged ({why}): skipped")
            if ckpt is not None:
                found, step = Found.WHOLE, int(ckpt.name.split("_")[1])
            elif skipped:
                found = Found.ALL_DAMAGED
        found, step = from_main_rank([found, step])
        if found == Found.ALL_DAMAGED:
            path, why = skipped[0] if skipped else (self.run_dir / CHECKPOINTS, "damaged")
            raise UserError(f"no checkpoint is whole; the newest: {why}", file=str(path),
                            hint="restore the checkpoint files, or move checkpoints/ away to start over")
        return self.run_dir / CHECKPOINTS / step_name(step) if found == Found.WHOLE else None

    def started(self, step: int, total: int) -> None:
        if self.d.is_main:
            self.restarts = mark_running(self.run_dir, step, total, os.getpid())
            clear_reports(self.run_dir)
            self.cadence.interruptions = self.restarts
            if step > 0:  # a resumed run: what its last save cost
                self.cadence.cost_s = last_logged_save_s(RunDir(self.run_dir).metrics)
        self.watchdog = Watchdog(self.run_dir, self.d.rank, self.d.world_size, self.spec.monitor.hang_timeout_s,
                                 total)
        self.watchdog.beat(step)
        self.last_save = time.time()  # a time cadence counts training, not the start-up before it
        # a start record, not a step's metric: metrics.jsonl only (W&B would file it under that step)
        self.mon.log({"step": step, "mem_base_mib": round(self.memory.base_mib, 1)}, to_sinks=False)

    def after_step(self, step: int, total: int, step_seconds: float, engine: Engine, meta: CheckpointMeta,
                   force_save: bool = False) -> str | None:
        """At a step boundary: agree on save/stop over all ranks, save if due; the stop reason.

        A checkpoint is saved on the spec's cadence, at the last step, when `force_save`,
        and whenever a rank asks to stop (signal, stop file, deadline near).
        """
        self.watchdog.beat(step, step_seconds)
        self._report_written(step)
        if not self._host_prepared:  # the first step gave the optimizer its state
            self._host_prepared = True
            self.checkpointer.prepare(engine)
        self._said_cadence(step, self.cadence.stepped(step, step_seconds))
        due = self.cadence.due(step, self.last_save)
        reason, save_now = self.stopper.agree(due, next_step_s=step_seconds + self.save_seconds)
        if save_now or reason or force_save or step == total:
            t0 = time.perf_counter()
            self.checkpointer.wait()  # a save never overlaps the write in flight
            self._report_written(step)
            waited = time.perf_counter() - t0
            saved = self.checkpointer.save(engine, meta)
            self.last_save = time.time()
            blocked = waited + saved.blocked_s
            if saved.background:
                # the deadline check's estimate of a save: the last write's time (set when it is
                # reported), unless blocking alone took longer
                self.save_seconds = max(self.save_seconds, blocked)
                self.mon.print(f"  checkpoint: {saved.path} (writing in the background; training blocked "
                               f"{blocked:.1f}s)")
            else:
                self.save_seconds = blocked
                self.mon.print(f"  checkpoint: {saved.path} ({blocked:.1f}s)")
            # how long training was blocked by the save (all of it when synchronous; a background
            # save also waits for the write before it, if still in flight)
            self.mon.log({"step": step, "ckpt_save_s": round(blocked, 3)})
            self._said_cadence(step, self.cadence.saved(step, round(blocked, 3)))
            self.watchdog.beat(step)
        if step == total or reason or force_save:
            self.watchdog.stop()  # no step follows: the export and the exit are not watched
            self.checkpointer.wait()  # the run ends (or stops) only with its checkpoint published
            self._report_written(step)
        return reason

    def _said_cadence(self, step: int, line: str | None) -> None:
        """`every_minutes: auto` chose an interval that moved: the console and metrics.jsonl."""
        if line:
            self.mon.print(f"  {line}")
            self.mon.log(self.cadence.record(step), to_sinks=False)

    def crashed(self) -> None:
        """Training raised: a background save in flight publishes before the process ends."""
        if self.watchdog is not None:
            self.watchdog.stop()  # no step follows
        self.checkpointer.settle(timeout_s=CRASH_SETTLE_S)
        for done in self.checkpointer.finished():
            self.mon.print(f"  checkpoint: {done.path.name} written before the attempt ended")

    def _report_written(self, step: int) -> None:
        """A background save that completed: say so, and log how long the whole save took."""
        for done in self.checkpointer.finished():
            self.save_seconds = done.total_s or 0.0  # what the next save may take (the deadline check)
            self.mon.print(f"  checkpoint: {done.path.name} written ({self.save_seconds:.1f}s in the background)")
            self.mon.log({"step": step, "ckpt_write_s": round(self.save_seconds, 3)})

    def preempted(self, step: int, total: int, reason: str, saved: bool = True) -> str:
        """Say (and record) that the run stopped resumable: with a checkpoint (`saved`), or
        before its first step, with what it had done kept (DPO's reference pass)."""
        done = "checkpoint saved" if saved else "before training, what was done is kept"
        self.mon.print(f"preempted ({reason}) at step {step}: {done}, resumable")
        if self.d.is_main:
            mark_preempted(self.run_dir, step, total, reason)
        self.mon.close(preempted=True)
        return "preempted"

    def finished(self, step: int, total: int, **extra) -> str:
        if self.d.is_main:
            mark_finished(self.run_dir, step, total, **extra)
        self.mon.close()
        return "finished"
