"""What an attempt ended as, and what follows: the one policy both launchers (local `run`
and the Slurm node task) apply. Pure functions of what the attempt left behind.

An attempt is one torchrun launch. It ends as:
  finished    the trainers completed the run                      -> done
  preempted   the ranks saved and stopped (signal, stop request)  -> resume (requeue on Slurm)
  hung        the watchdog stopped a run that made no progress    -> give up (not retried)
  cancelled   the user aborted it (Ctrl-C twice)                  -> give up
  user_error  a mistake in the spec or its files, found late      -> give up, exit 2 (never retried)
  disk_full   no space left in the run dir (the trainer said so)  -> give up (a retry cannot free
                                                                     space); resumable once freed
  failed      anything else (a crash, a killed rank)              -> retry if cluster.retries_on_failure
                                                                     allows, else give up
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from hpctrain.launcher.contract.states import State, mark_failed


class Outcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"
    HUNG = "hung"
    CANCELLED = "cancelled"
    USER_ERROR = "user_error"
    DISK_FULL = "disk_full"
    FAILED = "failed"


def attempt_outcome(rc: int, status: dict, aborted: bool = False) -> Outcome:
    """What one torchrun launch ended as, from its exit code and the status.json it left.

    A trainer that finds a user mistake records `user_error` and exits 0 (under torchrun a
    non-zero exit would bury its message); a trainer run without torchrun exits 2.
    """
    state = status.get("state")
    if status.get("user_error") and state == State.FAILED:
        return Outcome.USER_ERROR
    if status.get("disk_full") and state == State.FAILED:
        return Outcome.DISK_FULL
    if rc == 0 and state == State.FINISHED:
        return Outcome.FINISHED
    if rc == 0 and state == State.PREEMPTED:
        return Outcome.PREEMPTED
    if state == State.HUNG:
        return Outcome.HUNG
    if rc != 0 and aborted:
        return Outcome.CANCELLED
    if rc == 2:
        return Outcome.USER_ERROR
    return Outcome.FAILED


@dataclass(frozen=True)
class RetryVerdict:
    """What the failure policy says about a failed attempt."""

    retry: bool
    repeated_step: bool = False  # the same step failed twice in a row: a deterministic failure
    why: str = ""  # why not retrying ("" when retrying or no retries were allowed)


def retry_verdict(failed_steps: list[int], step: int, allowed: int) -> RetryVerdict:
    """The failure policy for a failure at `step` after earlier failures at `failed_steps`:
    at most `allowed` retries, never the same step failing twice in a row."""
    if failed_steps and failed_steps[-1] == step:
        return RetryVerdict(False, repeated_step=True, why=(
            f"failed again at step {step}: not retrying (the same step failed twice in a row, "
            "a deterministic failure)"))
    if len(failed_steps) >= allowed:
        return RetryVerdict(False, why=(
            f"{allowed} retr{'y' if allowed == 1 else 'ies'} used up (cluster.retries_on_failure)"
            if allowed else ""))
    return RetryVerdict(True)


def give_up(run_dir: str | Path, verdict: RetryVerdict, reason: str) -> None:
    """Record a verdict not to retry: a step that failed twice in a row joins the failure's reason."""
    if verdict.repeated_step:
        mark_failed(run_dir, f"{reason}; {verdict.why}")
