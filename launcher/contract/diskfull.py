"""A full disk, said in one line wherever it strikes (a rank's save, metrics or log; the
launcher's status, lock or logs). No torch.

A run dir keeps a small reserve file (`control/disk-reserve`, written by the launcher before
each attempt). Whoever meets "no space left" first frees it, so the record of why the run
stopped (status.json) and the one console line still fit on a disk that is otherwise full;
the next launch writes it again, and says the disk is full before starting any rank when it
cannot. Nothing is retried: only the user frees space, and the same command then resumes from
the newest complete checkpoint.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from hpctrain.launcher.contract.checkpoints import newest_whole_checkpoint
from hpctrain.launcher.contract.rundir import RunDir

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
RESERVE_BYTES = 256 << 10  # status.json, a lock, a few log lines: a few KiB each


def disk_full_cause(error: BaseException) -> OSError | None:
    """The "no space left" error behind `error` (torch.save wraps it in a RuntimeError), or None."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
    return None


def keep_reserve(run_dir: str | Path) -> None:
    """Write the run dir's reserve if it is absent (OSError when the disk has no room for it: a
    half-written reserve is removed)."""
    path = RunDir(run_dir).disk_reserve
    if path.is_file() and path.stat().st_size == RESERVE_BYTES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)  # real blocks, not a sparse file: freeing it frees space
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        raise


def free_reserve(run_dir: str | Path) -> bool:
    """Give the reserve's space back (the disk is full); whether there was one."""
    try:
        RunDir(run_dir).disk_reserve.unlink()
        return True
    except OSError:
        return False


def disk_full_reason(run_dir: str | Path, cause: OSError) -> str:
    """The one line: what filled, where, and the checkpoint the same command resumes from."""
    newest = newest_whole_checkpoint(run_dir, checksums=False)[0]
    where = f"step {int(newest.name.split('_')[1])} ({newest})" if newest else "none"
    what = f" writing {cause.filename}" if cause.filename else ""
    return (f"disk full: {cause.strerror or 'no space left'}{what} on the file system of {run_dir}; the newest "
            f"complete checkpoint is {where}: free space, then the same command resumes from it")
