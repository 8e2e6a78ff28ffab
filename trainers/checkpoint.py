"""Saving and loading checkpoints: complete or invisible, `latest` written last, last K kept.
The layout and the meta record are the contract's (launcher/contract/checkpoints.py).

Loading uses torch.load(weights_only=True): only tensors and plain containers.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from hpctrain.launcher.contract.checkpoints import (
    CHECKPOINTS,
    LATEST,
    META,
    CheckpointMeta,
    complete_checkpoints,
    file_records,
    rng_file,
    step_name,
    unfinished_name,
)
from hpctrain.launcher.contract.rundir import atomic_write_text

if TYPE_CHECKING:  # the engines import this module: their interface is named for types only
    from hpctrain.trainers.engines import Engine

__all__ = ["Checkpointer", "load_checkpoint", "rng_state", "set_rng_state"]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensor_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Python, numpy and torch RNG states in weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "python": json.dumps(random.getstate()),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])


@dataclass
class Saved:
    """One save: where it lands, how long training was blocked, how long the whole save took
    (None while a background write is in flight)."""

    path: Path
    step: int
    blocked_s: float
    total_s: float | None = None
    background: bool = False


class Checkpointer:
    """Saves at step boundaries (every rank calls `save`); one save at a time.

    With `background` and an engine whose rank 0 holds the whole state (`state_on_rank0`:
    DDP and one process), training is blocked only for a copy of it in host memory and the
    RNG files: rank 0 writes the copy in a thread and publishes the checkpoint (meta last,
    rename, `latest`, pruning) when the write is done. A new save, a stop and the end of the
    run wait for the write in flight (`wait`); so does an exception in training, for a while
    (`settle`); a kill during the write leaves the previous checkpoint as `latest`. Other
    engines (DeepSpeed, whose every rank writes shards) save synchronously.
    """

    def __init__(self, run_dir: Path, rank: int, keep_last: int, background: bool = True) -> None:
        self.run_dir, self.rank, self.keep_last, self.background = Path(run_dir), rank, keep_last, background
        self.root = self.run_dir / CHECKPOINTS
        self.host = HostCopy()
        self._thread: threading.Thread | None = None
        self._inflight: Saved | None = None
        self._error: BaseException | None = None
        self._done: list[Saved] = []  # background saves finished and not yet reported
        self.rank_state: Callable[[], dict] = dict  # the task's state of this rank (saved with its RNG)

    def _in_background(self, engine: Engine) -> bool:
        caps = engine.capabilities
        return self.background and (caps.state_on_rank0 or caps.saves_in_background)

    def save(self, engine: Engine, meta: CheckpointMeta) -> Saved:
        """Save the checkpoint of `meta.step` (every rank calls it)."""
        self.wait()  # one save at a time
        t0 = time.perf_counter()
        step = meta.step
        final, tmp = self.root / step_name(step), self.root / unfinished_name(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
            tmp.mkdir()
        _barrier()
        extra = self.rank_state()
        save_tensor_file({**rng_state(), **({"task": extra} if extra else {})}, tmp / rng_file(self.rank))
        if not self._in_background(engine):  # synchronous: every rank writes, then rank 0 publishes
            engine.save(tmp, self.rank)
            _barrier()
            if self.rank == 0:
                self.publish(tmp, final, meta)
            _barrier()
            total = time.perf_counter() - t0
            return Saved(final, step, total, total)
        if engine.capabilities.saves_in_background:  # every rank writes its own part
            written = engine.save_in_background(tmp, self.rank)
            _barrier()  # every rank's RNG file is on disk, every rank's copy taken
            saved = Saved(final, step, time.perf_counter() - t0, background=True)
            self._inflight = saved
            self._thread = threading.Thread(target=self._finish, args=(written, tmp, final, meta, t0, saved),
                                            name=f"checkpoint-step-{step}", daemon=True)
            self._thread.start()
            return saved
        files = self.host.take(engine.state_files(self.rank))
        _barrier()  # every rank's RNG file is on disk before rank 0 may publish
        saved = Saved(final, step, time.perf_counter() - t0, background=True)
        if self.rank == 0:
            self._inflight = saved
            self._thread = threading.Thread(
                target=self._write, args=(files, tmp, final, meta, t0, saved),
                name=f"checkpoint-step-{step}", daemon=True)
            self._thread.start()
        else:
            saved.total_s = saved.blocked_s  # this rank's part is done
        return saved

    def _finish(self, written, tmp: Path, final: Path, meta: CheckpointMeta, t0: float, saved: Saved) -> None:
        """An engine's own background write: wait for this rank's part; rank 0 publishes once
        its wait says every rank's is written."""
        try:
            written()
            if self.rank == 0:
                self.publish(tmp, final, meta)
            saved.total_s = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def prepare(self, engine: Engine) -> None:
        """Once the optimizer has its state: allocate the host memory background saves copy
        into now (a GPU's pinned memory, in a thread; `HostCopy.prepare`), so the first save
        blocks training no longer than the next."""
        if self._in_background(engine) and engine.capabilities.state_on_rank0 and self.rank == 0:
            self.host.prepare(engine.state_files(self.rank))

    def _write(self, files: dict, tmp: Path, final: Path, meta: CheckpointMeta, t0: float,
               saved: Saved) -> None:
        try:
            for name, obj in files.items():
                save_tensor_file(obj, tmp / name)
            self.publish(tmp, final, meta)
            saved.total_s = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def publish(self, tmp: Path, final: Path, meta: CheckpointMeta) -> None:
        """Rank 0, once every file is written: meta last, rename, `latest`, prune."""
        meta = replace(meta, saved_at=time.time(), files=file_records(tmp))  # sizes and checksums for resume
        atomic_write_text(tmp / META, meta.to_json())
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. stop right after an interval save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        for _, old in complete_checkpoints(self.run_dir)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def finished(self) -> list[Saved]:
        """The background saves published since the last call (to report them)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        done, self._done = self._done, []
        return done

    def settle(self, timeout_s: float) -> None:
        """The attempt is failing: give the save in flight up to `timeout_s` to publish, so a
        crash keeps the checkpoint it had already taken; its own error is printed, not raised
        (the crash is the error to report). A save still writing after that is left: the
        previous checkpoint stays `latest`."""
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            print(f"hpctrain: checkpoint {self._inflight.path.name if self._inflight else ''} still writing after "
                  f"{timeout_s:.0f}s: left unpublished", file=sys.stderr, flush=True)
            return
        try:
            self.wait()
        except RuntimeError as e:
            print(f"hpctrain: {e}", file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Block until the save in flight is published; re-raise its error."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread, saved, self._inflight = None, self._inflight, None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing checkpoint {saved.path.name if saved else ''} failed: {err}") from err
        if saved is not None:
            self._done.append(saved)


class HostCopy:
    """A checkpoint's state copied to host memory (rank 0, engines with `state_on_rank0`), for
    a background write while training goes on; the previous copy's memory is reused by the
    next (no write is in flight when a save begins)."""

    def __init__(self) -> None:
        self._copy: dict | None = None
        self._prep: threading.Thread | None = None

    def prepare(self, state: dict) -> None:
        """On a GPU: allocate the pinned host memory `take` copies into, in a thread, once the
        optimizer has its state (after the first step), so that every save, the first included
        (often the one a preemption asks for, with a grace period running), only copies; the
        pinning's cost moves to the start of the run (docs/benchmarks.md). Not on a CPU: there
        the copy shares the memory training uses, and holding it from step 1 would raise the
        peak of runs that save only at the end above `hpctrain plan`'s estimate. A failed
        allocation only leaves the first save to allocate."""
        device = _first_device(state)
        if device is None or device.type != "cuda" or self._copy is not None or self._prep is not None:
            return
        layout = host_layout(state)  # shapes and dtypes, read in the training thread

        def allocate() -> None:
            try:
                torch.cuda.set_device(device)  # pinned memory belongs to this GPU's context
                self._copy = empty_pinned(layout)
            except Exception:  # noqa: BLE001 - the first save allocates instead
                self._copy = None

        self._prep = threading.Thread(target=allocate, name="checkpoint-host-memory", daemon=True)
        self._prep.start()

    def take(self, state: dict) -> dict:
        """A copy of `state` that later optimizer steps cannot change."""
        if not state:
            return {}
        if self._prep is not None:  # memory allocated ahead (prepare)
            self._prep.join()
            self._prep = None
        self._copy = to_host(state, self._copy)
        device = _first_device(state)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the non-blocking copies have landed
        return dict(self._copy)


def _first_device(obj) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in values:
        d = _first_device(v)
        if d is not None:
            return d
    return None


def host_layout(obj):
    """A state's structure with each tensor replaced by its (shape, dtype): what `empty_pinned`
    allocates. Other values are left out (`to_host` copies them at each save)."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: host_layout(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [host_layout(v) for v in obj]
    return None


def empty_pinned(layout):
    """Page-locked host tensors for a `host_layout` (resident once allocated), for a GPU's
    non-blocking copies: `to_host(state, into=...)` then only copies."""
    if isinstance(layout, tuple):
        shape, dtype = layout
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    if isinstance(layout, dict):
        return {k: empty_pinned(v) for k, v in layout.items()}
    if isinstance(layout, list):
        return [empty_pinned(v) for v in layout]
    return None


def to_host(obj, into=None):
    """A copy of a state (nested dicts, lists, tensors) that the next optimizer step cannot
    change: every tensor copied into host memory (pinned for a GPU's), every container new.
    `into`, an earlier copy of the same state, is reused tensor by tensor: copying into memory
    already touched is several times faster than allocating it, page faults and all
    (docs/benchmarks.md), and the copy is what blocks training."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if isinstance(into, torch.Tensor) and into.shape == t.shape and into.dtype == t.dtype:
            return into.copy_(t, non_blocking=t.is_cuda)
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: to_host(v, into.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(to_host(v, i) for v, i in zip(obj, into, strict=True))
    return copy.deepcopy(obj)


def load_checkpoint(path: Path, engine: Engine, rank: int) -> CheckpointMeta:
    """Restore engine state and this rank's RNG; returns the checkpoint's meta record."""
    meta = CheckpointMeta.read(path)
    engine.load(path, meta)
    rng = path / rng_file(rank)
    if rng.is_file():  # a different world size has no state for new ranks: they keep their seed
        state = torch.load(rng, weights_only=True)
        set_rng_state(state)
        meta.rank_state = state.get("task")
    return meta
