"""How a trainer rank ends on a failure it can name: a user error, a full disk, a peer's failure.

Under torchrun a rank that exits non-zero makes torchrun print its own error report over the
console, so a rank that has recorded why the attempt ends in status.json exits 0 and the
launcher (local or the Slurm node task) reads the record (launcher/attempt.py).

- A user error (`user_error_exit`): one line on the console, recorded for the launcher, which
  exits 2 with it; never retried.
- The disk filling up (a save, metrics, a log line): the incomplete checkpoint folder and the
  run dir's reserve are removed (contract/diskfull.py: the space they free lets the record be
  written), the status says where and which checkpoint is the newest complete one; not retried
  (nothing frees the space but the user), and the same command resumes once there is room.
- A rank whose peer went away after recording such a reason: its own error (a collective whose
  peer vanished) is a consequence, not a second failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from hpctrain.launcher.contract.checkpoints import CHECKPOINTS
from hpctrain.launcher.contract.diskfull import disk_full_cause, disk_full_reason, free_reserve
from hpctrain.launcher.contract.errors import EXIT_USER_ERROR
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.states import State, mark_failed, read_status

__all__ = ["disk_full_cause", "disk_full_exit", "peer_recorded_failure", "under_torchrun", "user_error_exit"]


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def disk_full_exit(cause: OSError, run_dir: Path, since: float) -> int:
    """Record a full disk (see the module docstring); returns this rank's exit code. When the
    record does not fit but a peer's (after `since`, this rank's start) is there, that one
    stands for both: two ranks that meet the full disk at once (the last save) both free what
    they can, and the first record can take the space the second one needed."""
    for tmp in (Path(run_dir) / CHECKPOINTS).glob(".step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    free_reserve(run_dir)
    reason = disk_full_reason(run_dir, cause)
    with contextlib.suppress(OSError):  # the rank's log is on that disk too
        print(f"hpctrain: {reason}", file=sys.stderr, flush=True)
    try:
        mark_failed(run_dir, reason, disk_full=True)
    except OSError:
        if peer_recorded_failure(run_dir, since) is None:
            return 1  # not even the record fits: torchrun's report is all that is left
    return 0 if under_torchrun() else 1


def peer_recorded_failure(run_dir: Path, since: float) -> str | None:
    """The reason a peer recorded for ending this attempt (a user error, a full disk), if any:
    only a record written after `since` (this rank's start), never the last attempt's."""
    try:
        if RunDir(run_dir).status.stat().st_mtime < since:
            return None
    except OSError:
        return None
    st = read_status(run_dir)
    if st.state == State.FAILED and (st.user_error or st.disk_full):
        return st.reason
    return None


def user_error_exit(error: Exception, run_dir: str | Path | None) -> int:
    """Report a user mistake from a trainer process; returns its exit code.

    Under torchrun a non-zero exit buries the message under torchrun's own traceback,
    so a trainer there exits 0 after recording `user_error` in status.json; the
    launcher reads it and exits 2. Run directly, the trainer exits 2 itself.
    """
    print(f"hpctrain: error: {error}", file=sys.stderr)
    if run_dir and os.environ.get("RANK", "0") == "0":
        mark_failed(run_dir, str(error), user_error=True)
    return 0 if under_torchrun() else EXIT_USER_ERROR
