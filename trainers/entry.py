"""The entry point of a trainer rank: command line, process settings, the frozen spec, the
process group, and how a rank ends (a user error, a full disk, a peer's failure).

    torchrun ... -m hpctrain.trainers.pretrain --run-dir RUN_DIR [--stop-file F] [--deadline T]

The environment is read here and passed down as values.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import RunSpec, load_spec_dict, spec_from_dict
from hpctrain.trainers.distributed import Dist, bind_rank_cpus, init_distributed, shutdown
from hpctrain.trainers.engines import engine_class
from hpctrain.trainers.exits import (
    disk_full_cause,
    disk_full_exit,
    peer_recorded_failure,
    under_torchrun,
    user_error_exit,
)
from hpctrain.trainers.faults import Faults
from hpctrain.trainers.faults import install as install_faults
from hpctrain.trainers.preemption import die_with_parent


@dataclass(frozen=True)
class Launch:
    """What the entry point read from its command line."""

    run_dir: Path
    deadline: float | None = None  # epoch seconds by which a checkpoint must exist
    stop_path: Path | None = None  # the node task's per-attempt stop file
    echo_to_log: bool = False  # console lines are copied to the rank log


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
        echo_to_log=args.echo_to_log,
    )
    install_faults(Faults.from_env())  # test-only switches; nothing when unset
    try:
        spec = frozen_spec(launch.run_dir)
        engine = engine_class(spec)
        if engine.gathers_by_block(spec, int(os.environ.get("WORLD_SIZE", 1))):
            return_large_blocks()
        else:
            keep_freed_memory()
        deterministic_algorithms()
        d = init_distributed(spec.cluster.backend, always_group=engine.needs_process_group)
        train(spec, launch, d)
    except UserError as e:
        return user_error_exit(e, launch.run_dir)
    except Exception as e:
        full = disk_full_cause(e)
        if full is not None:
            return disk_full_exit(full, launch.run_dir, since=started)
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


def _mallopt():
    """glibc's mallopt, or None where malloc is not ours to tune: off Linux/glibc, or when the
    environment tunes it already (MALLOC_*_ variables, GLIBC_TUNABLES with glibc.malloc)."""
    if sys.platform != "linux" or any(k in os.environ for k in MALLOC_ENV):
        return None
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """glibc malloc: keep the memory a training step frees for the next step instead of giving
    it back to the kernel and faulting it in again. True when set.

    A CPU step allocates and frees the same large tensors every time (activations, logits and
    their gradients). glibc serves blocks above its mmap threshold with fresh mappings, and
    trims the heap top once the free space there passes its trim threshold (dynamic: twice the
    largest block freed so far, at most 64 MiB); every step's first touch of that memory is
    then a page fault per 4 KiB, a large share of a small model's step on a CPU (measured in
    docs/benchmarks.md). The trainer's peak memory does not change (the same blocks, reused);
    memory it frees stays with the process. Blocks of 32 MiB or more are still mapped fresh
    each time (glibc's ceiling).

    Left alone when the environment tunes malloc itself (MALLOC_*_ variables, GLIBC_TUNABLES
    with glibc.malloc), and off glibc (no mallopt)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # -1: never trim (glibc reads it as SIZE_MAX)
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))


SHARDED_MMAP_THRESHOLD = 1 << 20


def return_large_blocks() -> bool:
    """glibc malloc for an engine that gathers by block (fsdp, ZeRO-3): blocks of 1 MiB or
    more are mapped fresh and given back when freed. Both gather each block's weights and
    reduce its gradients into buffers that live for one block's forward or backward; with
    glibc's growing mmap threshold (or `keep_freed_memory`) they come from the heap, which
    fragments and holds the sum of them. A rank's peak above its start on 2 ranks: fsdp, 30M
    bench model, 671 MiB with this setting, about 910 with the trainer's default (DDP 927);
    ZeRO-3, 40M model from an HF folder, 1,093 against 1,450 (DDP 1,358). Same environment
    rules as `keep_freed_memory`; True when set."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, SHARDED_MMAP_THRESHOLD))


CUBLAS_CONFIG, CUBLAS_DETERMINISTIC = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"


def deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of
    torch._inductor.config (2.5 s per rank): eager kernels read the flag set here, and
    `training.compile`, which imports torch._inductor anyway, gets its `deterministic` switch
    set when the compiler is loaded (below, or by torch.compile reading the global flag).

    Without filling uninitialized memory (`torch.utils.deterministic.fill_uninitialized_memory`,
    on by default with the flag): every `torch.empty` an op allocates for its output would be
    filled with NaN first, a pass over memory that only matters for a kernel that leaves part
    of its output unwritten (its cost: docs/benchmarks.md). Resume stays bitwise (the suite).

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
