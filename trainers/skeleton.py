"""The part both trainers share: entry point, seeding, resume, checkpoint cadence and stop
agreement, status. `pretrain.py` and `finetune.py` keep only what differs: their data,
model, objective and evaluation, and their loop, which reads top to bottom:

    run = Run(spec, launch, dist)                 # console/metrics, stop requests
    meta = run.resume(engine, batches)            # newest complete checkpoint, if any
    while step < total:
        ... micro-steps, engine.step(), log, maybe evaluate ...
        reason = run.after_step(step, total, secs, engine, state)  # agree on save/stop, save
        if reason: return run.preempted(step, total, reason)
    run.finished(step, total)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpctrain.launcher.contract.checkpoints import CHECKPOINTS, newest_whole_checkpoint
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir, stop_file
from hpctrain.launcher.contract.spec import RunSpec, load_spec_dict, spec_from_dict
from hpctrain.launcher.contract.states import mark_finished, mark_preempted, mark_running
from hpctrain.trainers.checkpoint import Checkpointer, checkpoint_due, load_checkpoint
from hpctrain.trainers.distributed import (
    Dist,
    bind_rank_cpus,
    from_main_rank,
    init_distributed,
    shutdown,
)
from hpctrain.trainers.exits import (
    disk_full_cause,
    disk_full_exit,
    peer_recorded_failure,
    under_torchrun,
)
from hpctrain.trainers.monitor import (
    Monitor,
    PeakMemory,
    Throughput,
    device_peak_tflops,
    user_error_exit,
)
from hpctrain.trainers.preemption import StopRequest, die_with_parent
from hpctrain.trainers.watchdog import Watchdog, clear_reports


@dataclass(frozen=True)
class Launch:
    """What the entry point read from its command line and environment."""

    run_dir: Path
    deadline: float | None = None  # epoch seconds by which a checkpoint must exist
    stop_path: Path | None = None  # the node task's per-attempt stop file
    fault_pause: tuple[int, float] | None = None  # tests: (step, seconds) to pause inside a save
    fault_fail_at: int | None = None  # tests: rank 0 crashes after this step, every attempt
    fault_stall: tuple[int, int] | None = None  # tests: (rank, step) that stops making progress
    echo_to_log: bool = False  # console lines are copied to the rank log


def _fault(name: str, *types: type):
    """A test-only fault switch from the environment: None when unset, else its colon-separated
    fields converted by `types` (one type: the value itself)."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    fields = raw.split(":")
    if len(fields) != len(types):
        raise SystemExit(f"{name}={raw!r}: expected {len(types)} colon-separated field(s)")
    values = tuple(t(f) for t, f in zip(types, fields, strict=True))
    return values[0] if len(values) == 1 else values


def entry_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir")
    ap.add_argument("--stop-file", default=None, help="file whose existence asks the run to save and stop")
    ap.add_argument("--echo-to-log", action="store_true", help="copy console lines to stderr (rank log)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds by which a checkpoint must exist")
    return ap


def frozen_spec(run_dir: Path) -> RunSpec:
    frozen = RunDir(run_dir).spec_file
    if not frozen.is_file():
        raise UserError("not a run directory (no spec.yaml)", file=str(run_dir))
    return spec_from_dict(load_spec_dict(frozen), str(frozen))


def run_entry(args: argparse.Namespace, train: Callable[[RunSpec, Launch, Dist], str]) -> int:
    """Start one trainer rank: frozen spec, process group, train; a user error exits cleanly."""
    die_with_parent()
    started = time.time()
    if os.environ.get("HPCTRAIN_RANK_CPUS") == "split":  # the Slurm node task's CPUs, a slice per rank
        local = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cpus = bind_rank_cpus(*local)
        print(f"hpctrain: local rank {local[0]} of {local[1]} runs on CPUs {cpus}", file=sys.stderr, flush=True)
    # the environment is read here, at the entry point, and passed down as values
    launch = Launch(
        run_dir=Path(args.run_dir),
        deadline=args.deadline,
        stop_path=Path(args.stop_file) if args.stop_file else None,
        fault_pause=_fault("HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S", int, float),  # "STEP:SECONDS"
        fault_fail_at=_fault("HPCTRAIN_FAULT_FAIL_AT_STEP", int),  # "STEP"
        fault_stall=_fault("HPCTRAIN_FAULT_STALL", int, int),  # "RANK:STEP"
        echo_to_log=args.echo_to_log,
    )
    try:
        spec = frozen_spec(launch.run_dir)
        keep_freed_memory()
        deterministic_algorithms()
        d = init_distributed(spec.cluster.backend, always_group=spec.engine.type == "deepspeed")
        train(spec, launch, d)
    except UserError as e:
        return user_error_exit(e, launch.run_dir)
    except Exception as e:
        full = disk_full_cause(e)
        if full is not None:
            return disk_full_exit(full, launch.run_dir)
        peer = peer_recorded_failure(launch.run_dir, since=started)
        if peer is None:
            raise
        print(f"hpctrain: this rank stops because a peer ended the attempt: {peer}", file=sys.stderr)
        return 0 if under_torchrun() else 1
    finally:
        shutdown()
    return 0


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """glibc malloc: keep the memory a training step frees for the next step instead of giving
    it back to the kernel and faulting it in again. True when set.

    A CPU step allocates and frees the same large tensors every time (activations, logits and
    their gradients). glibc serves blocks above its mmap threshold with fresh mappings, and
    trims the heap top once the free space there passes its trim threshold (dynamic: twice the
    largest block freed so far, at most 64 MiB); every step's first touch of that memory is
    then a page fault per 4 KiB. Measured with bench_trainer's tiny Llama (vocab 30,522, logits
    31 MiB per step), each loop in its own process: 15,000-18,000 minor faults per step, 50-63
    ms of a 117 ms step in the kernel; with trimming off and the mmap threshold at its maximum,
    250-300 faults per step (all in the first steps) and 79-94 ms per step. The trainer's peak
    memory does not change (the same blocks, reused); memory it frees stays with the process.
    Blocks of 32 MiB or more are still mapped fresh each time (glibc's ceiling).

    Left alone when the environment tunes malloc itself (MALLOC_*_ variables, GLIBC_TUNABLES
    with glibc.malloc), and off glibc (no mallopt)."""
    if sys.platform != "linux" or any(k in os.environ for k in MALLOC_ENV):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # -1: never trim (glibc reads it as SIZE_MAX)
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))


CUBLAS_CONFIG, CUBLAS_DETERMINISTIC = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"


def deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of
    torch._inductor.config (2.5 s per rank here), which only tells torch.compile, which the
    trainers do not use; eager kernels read the flag set here.

    Without filling uninitialized memory (`torch.utils.deterministic.fill_uninitialized_memory`,
    on by default with the flag): every `torch.empty` an op allocates for its output would be
    filled with NaN first, a pass over memory that only matters for a kernel that leaves part
    of its output unwritten. Measured on bench_trainer's bare loop (CPU, 300 steps, medians of
    3 interleaved rounds): deterministic with the fill 9.45 steps/s, without it 10.11,
    deterministic off 9.84 (the profiler: 5.6x the fill calls with it). In the trainer itself the
    difference stayed inside this VM's noise (two rounds each way, 9.1-10.2 steps/s); on a GPU
    each fill is a pass over device memory. Resume stays bitwise (the test suite).

    On a GPU, cuBLAS is deterministic only with a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`
    ":4096:8" or ":16:8", read when the first cuBLAS handle is made, so set here, before any
    CUDA work). Without it PyTorch, under this flag with warn_only, builds and raises a
    warning on every cuBLAS call (hundreds per step, each through Python's warnings machinery)
    and the results may still differ between runs. ":4096:8" is 32 MiB of workspace, PyTorch's
    default on Hopper and Blackwell (8 MiB before them). A value the user set is left alone."""
    os.environ.setdefault(CUBLAS_CONFIG, CUBLAS_DETERMINISTIC)
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch._C._set_deterministic_fill_uninitialized_memory(False)
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].deterministic = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        self.stopper = StopRequest(launch.stop_path or stop_file(self.run_dir), launch.deadline,
                                   margin_s=5.0)
        self.last_save, self.save_seconds = time.time(), 0.0
        self.checkpointer = Checkpointer(self.run_dir, d.rank, spec.checkpoint.keep_last,
                                         background=spec.checkpoint.background)
        self._host_prepared = False  # Checkpointer.prepare, after the first step
        if spec.engine.type == "deepspeed":  # imported before the memory baseline is taken
            from hpctrain.trainers.engine_deepspeed import import_deepspeed

            import_deepspeed(d.device)
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

    def resume(self, engine, batches) -> dict:
        """Load the newest complete checkpoint (found by scanning); its meta, or {}."""
        ckpt = self.whole_checkpoint()
        if ckpt is None:
            return {}
        meta = load_checkpoint(ckpt, engine, self.d.rank)
        batches.load_state_dict(meta["sampler"])
        self.mon.print(
            f"resuming from {ckpt} (step {meta['step']}, {meta.get('tokens_seen', 0):,} tokens seen, "
            f"saved by {meta['world_size']} rank(s), now {self.d.world_size})"
        )
        return meta

    def whole_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files are as saved (rank 0 checks, every rank takes its
        answer): a damaged one is skipped and said; none whole is refused, naming the file."""
        choice, skipped = -1, []
        if self.d.is_main:
            ckpt, skipped = newest_whole_checkpoint(self.run_dir)
            for path, why in skipped:
                self.mon.print(f"checkpoint {path.name} is damaged ({why}): skipped")
            choice = -2 if ckpt is None and skipped else (-1 if ckpt is None else int(ckpt.name.split("_")[1]))
        choice = from_main_rank(choice)
        if choice == -2:
            path, why = skipped[0] if skipped else (self.run_dir / CHECKPOINTS, "damaged")
            raise UserError(f"no checkpoint is whole; the newest: {why}", file=str(path),
                            hint="restore the checkpoint files, or move checkpoints/ away to start over")
        return None if choice == -1 else self.run_dir / CHECKPOINTS / f"step_{choice:08d}"

    def started(self, step: int, total: int) -> None:
        if self.d.is_main:
            self.restarts = mark_running(self.run_dir, step, total, os.getpid())
            clear_reports(self.run_dir)
        self.watchdog = Watchdog(self.run_dir, self.d.rank, self.d.world_size, self.spec.monitor.hang_timeout_s,
                                 total)
        self.watchdog.beat(step)
        # a start record, not a step's metric: metrics.jsonl only (W&B would file it under that step)
        self.mon.log({"step": step, "mem_base_mib": round(self.memory.base_mib, 1)}, to_sinks=False)

    def after_step(self, step: int, total: int, step_seconds: float, engine, state: dict,
                   force_save: bool = False) -> str | None:
        """At a step boundary: agree on save/stop over all ranks, save if due; the stop reason.

        A checkpoint is saved on the spec's cadence, at the last step, when `force_save`,
        and whenever a rank asks to stop (signal, stop file, deadline near).
        """
        self.watchdog.beat(step, step_seconds)
        if self.launch.fault_fail_at == step and self.d.is_main:
            raise RuntimeError(f"HPCTRAIN_FAULT_FAIL_AT_STEP: a deliberate crash after step {step} (tests)")
        if self.launch.fault_stall == (self.d.rank, step):
            print(f"HPCTRAIN_FAULT_STALL: rank {self.d.rank} stops at step {step} (tests)", file=sys.stderr, flush=True)
            time.sleep(3600)
        self._report_written(step)
        if not self._host_prepared:  # the first step gave the optimizer its state
            self._host_prepared = True
            self.checkpointer.prepare(engine)
        due = checkpoint_due(self.spec.checkpoint, step, self.last_save)
        reason, save_now = self.stopper.agree(due, next_step_s=step_seconds + self.save_seconds)
        if save_now or reason or force_save or step == total:
            pause = self.launch.fault_pause
            t0 = time.perf_counter()
            self.checkpointer.wait()  # a save never overlaps the write in flight
            self._report_written(step)
            waited = time.perf_counter() - t0
            saved = self.checkpointer.save(
                step, engine, {**state, "world_size": self.d.world_size, "spec_name": self.spec.name},
                pause_before_commit_s=pause[1] if pause and pause[0] == step else 0.0,
            )
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
            self.watchdog.beat(step)
        if step == total or reason or force_save:
            self.watchdog.stop()  # no step follows: the export and the exit are not watched
            self.checkpointer.wait()  # the run ends (or stops) only with its checkpoint published
            self._report_written(step)
        return reason

    def _report_written(self, step: int) -> None:
        """A background save that completed: say so, and log how long the whole save took."""
        for done in self.checkpointer.finished():
            self.save_seconds = done.total_s or 0.0  # what the next save may take (the deadline check)
            self.mon.print(f"  checkpoint: {done.path.name} written ({self.save_seconds:.1f}s in the background)")
            self.mon.log({"step": step, "ckpt_write_s": round(self.save_seconds, 3)})

    def preempted(self, step: int, total: int, reason: str) -> str:
        """Say (and record) that the run stopped with a resumable checkpoint."""
        self.mon.print(f"preempted ({reason}) at step {step}: checkpoint saved, resumable")
        if self.d.is_main:
            mark_preempted(self.run_dir, step, total, reason)
        self.mon.close(preempted=True)
        return "preempted"

    def finished(self, step: int, total: int, **extra) -> str:
        if self.d.is_main:
            mark_finished(self.run_dir, step, total, **extra)
        self.mon.close()
        return "finished"
