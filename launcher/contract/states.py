"""The run's state in RUN_DIR/status.json and its transitions: this module is its only writer.

    (new)     -> running
    running   -> preempted (checkpoint saved, resumable) | finished | failed | hung
    preempted -> running (resumed) | stopped (Slurm would not requeue it)
    any       -> cancelled (the user ended it)

`State` is a `str` enum: status.json holds its value, and a state read back compares equal
to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text, last_logged_step


class State(str, Enum):
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    HUNG = "hung"
    CANCELLED = "cancelled"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Retry:
    """A failed attempt that was retried: the step it failed at, why, and the launch or Slurm
    job whose retry budget it spent (`scope`)."""

    step: int
    reason: str
    scope: str = ""


@dataclass(frozen=True)
class Status:
    """status.json, typed: what the newest attempt of a run left. Read it with `read_status`;
    it is written only by this module's transitions."""

    state: State | None = None  # None: no attempt has started in this run dir
    step: int = 0
    total_steps: int | None = None
    reason: str = ""
    pid: int | None = None
    attempts: int = 0
    retries: tuple[Retry, ...] = ()
    user_error: bool = False  # a mistake in the spec or its files: a retry would repeat it
    disk_full: bool = False  # no space in the run dir: a retry cannot free it
    best: dict[str, float] = field(default_factory=dict)  # fine-tuning: the best metric's value

    @classmethod
    def from_dict(cls, data: dict) -> Status:
        try:
            state = State(data["state"]) if data.get("state") else None
        except ValueError:
            state = None
        retries = tuple(Retry(int(r.get("step", 0)), str(r.get("reason", "")), str(r.get("scope", "")))
                        for r in data.get("retries", []) if isinstance(r, dict))
        return cls(state=state, step=int(data.get("step", 0) or 0), total_steps=data.get("total_steps"),
                   reason=str(data.get("reason") or ""), pid=data.get("pid"), attempts=int(data.get("attempts", 0)),
                   retries=retries, user_error=bool(data.get("user_error")), disk_full=bool(data.get("disk_full")),
                   best=dict(data.get("best") or {}))

    def retried_steps(self, scope: str) -> list[int]:
        """The steps of the retries that spent `scope`'s budget, oldest first."""
        return [r.step for r in self.retries if r.scope == scope]


def read_status(run_dir: str | Path) -> Status:
    """The run's status (an empty `Status` where no attempt has started, or the file is cut)."""
    return Status.from_dict(_read_raw(run_dir))


def _read_raw(run_dir: str | Path) -> dict:
    p = RunDir(run_dir).status
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


CARRIED = ("attempts", "retries")  # kept through every transition


def _write_status(run_dir: str | Path, **fields) -> None:
    old = _read_raw(run_dir)
    fields = {**{k: old[k] for k in CARRIED if k in old}, **fields}
    atomic_write_text(RunDir(run_dir).status, json.dumps(fields, sort_keys=True) + "\n")


def mark_running(run_dir: str | Path, step: int, total: int, pid: int) -> int:
    """An attempt starts; returns how many attempts before it started (restarts)."""
    restarts = read_status(run_dir).attempts
    _write_status(run_dir, state=State.RUNNING, step=step, total_steps=total, pid=pid, attempts=restarts + 1)
    return restarts


def mark_preempted(run_dir: str | Path, step: int, total: int, reason: str) -> None:
    """The ranks saved a checkpoint at `step` and stopped: resumable. A run the user cancelled
    (whose ranks saved on the way out) stays cancelled."""
    old = _read_raw(run_dir)
    if old.get("state") == State.CANCELLED:
        _write_status(run_dir, **{**old, "step": step, "total_steps": total})
        return
    _write_status(run_dir, state=State.PREEMPTED, step=step, total_steps=total, reason=reason)


def mark_finished(run_dir: str | Path, step: int, total: int, **extra) -> None:
    _write_status(run_dir, state=State.FINISHED, step=step, total_steps=total, **extra)


def mark_failed(run_dir: str | Path, reason: str, user_error: bool = False, disk_full: bool = False) -> None:
    """The attempt failed: its reason and the last step it logged (not the step it started at).
    `user_error` and `disk_full` mark failures that a retry would only repeat."""
    old = _read_raw(run_dir)
    keep = {k: old[k] for k in ("step", "total_steps") if k in old}
    keep["step"] = max(keep.get("step", 0), last_logged_step(run_dir))
    flags = {k: True for k, v in (("user_error", user_error), ("disk_full", disk_full)) if v}
    _write_status(run_dir, **keep, state=State.FAILED, reason=reason, **flags)


def record_retry(run_dir: str | Path, reason: str, step: int, scope: str = "") -> None:
    """A failed attempt is being retried: keep its reason and step in the status's history
    (`scope`: the launch or Slurm job the retry belongs to; its retry budget is its own)."""
    old = _read_raw(run_dir)
    retries = [*old.get("retries", []), {"step": step, "reason": reason, "scope": scope}]
    _write_status(run_dir, **{**old, "retries": retries})


def mark_hung(run_dir: str | Path, step: int, total: int, reason: str) -> None:
    """No step completed within the watchdog's limit; the job ends (not requeued)."""
    _write_status(run_dir, state=State.HUNG, step=step, total_steps=total, reason=reason)


def mark_cancelled(run_dir: str | Path, reason: str) -> None:
    """Ended by the user (Ctrl-C twice, `hpctrain cancel`); the step reached is kept."""
    old = _read_raw(run_dir)
    step = max(old.get("step", 0), last_logged_step(run_dir))
    _write_status(run_dir, **{**old, "state": State.CANCELLED, "step": step, "reason": reason})


def mark_stopped(run_dir: str | Path, reason: str) -> None:
    """Preempted or timed out, and not requeued (the requeue limit)."""
    _write_status(run_dir, **{**_read_raw(run_dir), "state": State.STOPPED, "reason": reason})


