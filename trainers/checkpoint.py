"""Saving and loading checkpoints: complete or invisible, `latest` written last, last K kept.
The layout and the meta record are the contract's (launcher/contract/checkpoints.py).

Loading uses torch.load(weights_only=True): only tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpctrain.launcher.contract.checkpoints import (
    CHECKPOINTS,
    LATEST,
    META,
    complete_checkpoints,
    file_records,
    latest_checkpoint,
    rng_file,
    step_name,
    unfinished_name,
)
from hpctrain.launcher.contract.rundir import atomic_write_text

__all__ = ["Checkpointer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]


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


def checkpoint_due(cfg, step: int, last_save: float) -> bool:
    """Whether the spec's cadence (every N steps and/or M minutes) asks for a save now."""
    by_steps = bool(cfg.every_steps and step % cfg.every_steps == 0)
    by_time = bool(cfg.every_minutes and time.time() - last_save >= cfg.every_minutes * 60)
    return by_steps or by_time


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine,
    meta: dict,
    rank: int,
    keep_last: int,
    pause_before_commit_s: float = 0.0,
) -> Path:
    """Collective synchronous save: every rank calls it. Returns the final checkpoint path."""
    saver = Checkpointer(run_dir, rank, keep_last, background=False)
    return saver.save(step, engine, meta, pause_before_commit_s).path


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

    With `background` and an engine that can copy its state to host memory
    (`engine.host_state(rank)`: DDP and one process), training is blocked only for that copy
    and the RNG files: rank 0 writes the copy in a thread and publishes the checkpoint (meta
    last, rename, `latest`, pruning) when the write is done. A new save, a stop and the end of
    the run wait for the write in flight (`wait`); a crash during it leaves the previous
    checkpoint as `latest`. Other engines (DeepSpeed, whose every rank writes shards) save
    synchronously.
    """

    def __init__(self, run_dir: Path, rank: int, keep_last: int, background: bool = True) -> None:
        self.run_dir, self.rank, self.keep_last, self.background = Path(run_dir), rank, keep_last, background
        self.root = self.run_dir / CHECKPOINTS
        self._thread: threading.Thread | None = None
        self._inflight: Saved | None = None
        self._error: BaseException | None = None
        self._done: list[Saved] = []  # background saves finished and not yet reported

    def save(self, step: int, engine, meta: dict, pause_before_commit_s: float = 0.0) -> Saved:
        self.wait()  # one save at a time
        t0 = time.perf_counter()
        final, tmp = self.root / step_name(step), self.root / unfinished_name(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
            tmp.mkdir()
        _barrier()
        save_tensor_file(rng_state(), tmp / rng_file(self.rank))
        meta = {**meta, "step": step}
        host = getattr(engine, "host_state", None) if self.background else None
        files = host(self.rank) if host else None
        if files is None:  # synchronous: every rank writes, then rank 0 publishes
            engine.save(tmp, self.rank)
            _barrier()
            if self.rank == 0:
                self._commit(tmp, final, meta, pause_before_commit_s)
            _barrier()
            total = time.perf_counter() - t0
            return Saved(final, step, total, total)
        _barrier()  # every rank's RNG file is on disk before rank 0 may publish
        saved = Saved(final, step, time.perf_counter() - t0, background=True)
        if self.rank == 0:
            self._inflight = saved
            self._thread = threading.Thread(
                target=self._write, args=(files, tmp, final, meta, pause_before_commit_s, t0, saved),
                name=f"checkpoint-step-{step}", daemon=True)
            self._thread.start()
        else:
            saved.total_s = saved.blocked_s  # this rank's part is done
        return saved

    def prepare(self, engine) -> None:
        """Once the optimizer has its state: an engine that copies its state to host memory
        for background saves may allocate that memory now, in a thread (`prepare_host_state`:
        the DDP engine on a GPU), so the first save blocks training no longer than the next."""
        prepare = getattr(engine, "prepare_host_state", None) if self.background else None
        if prepare is not None:
            prepare(self.rank)

    def _write(self, files: dict, tmp: Path, final: Path, meta: dict, pause: float, t0: float,
               saved: Saved) -> None:
        try:
            for name, obj in files.items():
                save_tensor_file(obj, tmp / name)
            self._commit(tmp, final, meta, pause)
            saved.total_s = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def _commit(self, tmp: Path, final: Path, meta: dict, pause_before_commit_s: float) -> None:
        """Rank 0, once every file is written: meta last, rename, `latest`, prune."""
        if pause_before_commit_s:  # fault injection for tests: a window to kill a rank mid-save
            time.sleep(pause_before_commit_s)
        files = file_records(tmp)  # every rank's files are written: sizes and checksums for resume
        atomic_write_text(tmp / META, json.dumps({**meta, "saved_at": time.time(), "files": files}, indent=2))
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


def load_checkpoint(path: Path, engine, rank: int) -> dict:
    """Restore engine state and this rank's RNG; returns meta (step, tokens, sampler...)."""
    meta = json.loads((path / META).read_text())
    engine.load(path)
    rng = path / rng_file(rank)
    if rng.is_file():  # a different world size has no state for new ranks: they keep their seed
        set_rng_state(torch.load(rng, weights_only=True))
    return meta
