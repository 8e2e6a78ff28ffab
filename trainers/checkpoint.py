"""Checkpoints: complete or invisible, `latest` written last, last K kept.

    checkpoints/.step_N.tmp/   being written (ignored by every reader)
    checkpoints/step_N/        complete: it holds meta.json, written last before the rename
      model.pt optim.pt        engine state (rank 0 for DDP; DeepSpeed writes its own files)
      rng_rank{R}.pt           every rank's RNG states
      meta.json                step, tokens seen, sampler state, world size, time
    checkpoints/latest         "step_N" of the newest complete checkpoint

Loading uses torch.load(weights_only=True): only tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpctrain.launcher.rundir import (
    CHECKPOINTS,
    META,
    atomic_write_text,
    complete_checkpoints,
    latest_checkpoint,
)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]


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
    """Collective save: every rank calls it. Returns the final checkpoint path."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir()
    _barrier()
    save_tensor_file(rng_state(), tmp / f"rng_rank{rank}.pt")
    engine.save(tmp, rank)
    _barrier()
    if rank == 0:
        if pause_before_commit_s:  # fault injection for tests: a window to kill a rank mid-save
            time.sleep(pause_before_commit_s)
        atomic_write_text(
            tmp / META, json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2)
        )
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. stop right after an interval save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engine, rank: int) -> dict:
    """Restore engine state and this rank's RNG; returns meta (step, tokens, sampler...)."""
    meta = json.loads((path / META).read_text())
    engine.load(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if (
        rng_file.is_file()
    ):  # a different world size has no state for new ranks: they keep their seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
