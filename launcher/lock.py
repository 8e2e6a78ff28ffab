"""One live run per run directory: RUN_DIR/control/lock names its holder.

A holder is a process (`hpctrain run`: host and pid) or a Slurm job (`hpctrain submit`: the job
id; its requeues and every node task are the same holder). A second run or submit is refused at
once, naming the holder; a holder that is gone (its process dead, its job ended or unknown to
Slurm) leaves a lock that the next run takes over, saying so. A holder that cannot be checked
from here (a process on another host, a job while Slurm cannot be asked) counts as alive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.slurm_cmd import slurm_command

LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                   "CONFIGURING", "COMPLETING", "RESIZING", "STAGE_OUT", "SIGNALING"}


def lock_path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).lock


def process_owner(what: str) -> dict:
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def job_owner(job_id: str) -> dict:
    return {"what": "slurm job", "job_id": str(job_id), "since": time.time()}


def same_holder(a: dict, b: dict) -> bool:
    if a.get("job_id") or b.get("job_id"):
        return a.get("job_id") == b.get("job_id")
    return (a.get("host"), a.get("pid")) == (b.get("host"), b.get("pid"))


def describe(holder: dict) -> str:
    if holder.get("job_id"):
        return f"Slurm job {holder['job_id']}"
    return f"{holder.get('what', 'a process')} (pid {holder.get('pid')} on {holder.get('host')})"


def _job_alive(job_id: str) -> tuple[bool | None, str]:
    try:
        out = slurm_command(["scontrol", "show", "job", "-o", job_id], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, "Slurm cannot be asked from here"
    if out.returncode != 0:
        return False, "unknown to Slurm"
    state = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv).get("JobState", "")
    return state in LIVE_JOB_STATES, state


def _process_alive(holder: dict) -> tuple[bool | None, str]:
    if holder.get("host") != socket.gethostname():
        return None, f"on another host ({holder.get('host')})"
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, "no longer running"
    except PermissionError:
        return True, "running"
    try:  # a recycled pid belongs to another program
        if b"hpctrain" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False, "no longer running (its pid is another program's now)"
    except OSError:
        pass
    return True, "running"


def holder_alive(holder: dict) -> tuple[bool | None, str]:
    """(alive: True/False, or None when it cannot be told from here; what was found)."""
    return _job_alive(holder["job_id"]) if holder.get("job_id") else _process_alive(holder)


def read_holder(run_dir: str | Path) -> dict | None:
    try:
        return json.loads(lock_path(run_dir).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"what": "an unreadable lock"}


def acquire(run_dir: str | Path, owner: dict, log=print) -> None:
    """Hold the run dir for `owner`, or raise UserError naming the live holder."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".lock.{os.getpid()}")
    tmp.write_text(json.dumps(owner) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: fails if a lock exists
                return
            except FileExistsError:
                pass
            holder = read_holder(run_dir)
            if holder is None:
                continue  # released meanwhile
            if same_holder(holder, owner):
                os.replace(tmp, path)
                return
            alive, found = holder_alive(holder) if "pid" in holder or "job_id" in holder else (None, "unreadable")
            if alive is not False:
                raise UserError(
                    f"another run holds this run dir: {describe(holder)}, {found}", file=str(run_dir),
                    hint=("wait for it, or end it (hpctrain cancel / Ctrl-C); if it is gone, remove "
                          f"{path}") if alive is None else "wait for it or end it (hpctrain cancel / Ctrl-C)")
            log(f"note: {describe(holder)} held this run dir and is gone ({found}): taking it over")
            os.replace(tmp, path)
            return
        raise UserError("the run dir lock keeps changing hands", file=str(path))
    finally:
        tmp.unlink(missing_ok=True)


def hand_over(run_dir: str | Path, owner: dict) -> None:
    """Give a lock we hold to another holder of ours (`submit`: to the job it submitted)."""
    tmp = lock_path(run_dir).with_name(f".lock.{os.getpid()}")
    tmp.write_text(json.dumps(owner) + "\n")
    os.replace(tmp, lock_path(run_dir))


def release(run_dir: str | Path, owner: dict) -> None:
    """Drop the lock if `owner` holds it (a lock another holder took over is left alone)."""
    holder = read_holder(run_dir)
    if holder is not None and same_holder(holder, owner):
        lock_path(run_dir).unlink(missing_ok=True)
