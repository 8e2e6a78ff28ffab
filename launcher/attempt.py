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

from hpctrain.launcher.contract.states import State, Status, mark_failed, record_retry


class Outcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"
    HUNG = "hung"
    CANCELLED = "cancelled"
    USER_ERROR = "user_error"
    DISK_FULL = "disk_full"
    FAILED = "failed"


def attempt_outcome(rc: int, status: Status, aborted: bool = False) -> Outcome:
    """What one torchrun launch ended as, from its exit code and the status.json it left.

    A trainer that finds a user mistake records `user_error` and exits 0 (under torchrun a
    non-zero exit would bury its message); a trainer run without torchrun exits 2.
    """
    state = status.state
    if status.user_error and state == State.FAILED:
        return Outcome.USER_ERROR
    if status.disk_full and state == State.FAILED:
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


class Action(enum.Enum):
    DONE = "done"  # the run is complete
    RESUME = "resume"  # saved and stopped: the same command (or the requeued job) resumes
    RETRY = "retry"  # failed; the failure policy allows another attempt from the newest checkpoint
    GIVE_UP = "give up"  # ended for good, until the user acts


@dataclass(frozen=True)
class AfterAttempt:
    """What a launcher does after an attempt, and the line it prints."""

    action: Action
    exit_code: int  # the command's exit code where the run ends here (local) or the job's verdict
    line: str = ""  # what the user is told ("" where the launcher's own report says it all)
    verdict: RetryVerdict | None = None  # the failure policy's, for a failed attempt


def after_attempt(outcome: Outcome, status: Status, retries_allowed: int, scope: str) -> AfterAttempt:
    """The one policy after an attempt, for the local launcher and the Slurm node task alike:
    finished -> done; preempted -> resume; a user error, a full disk, a hang or a cancel -> give
    up (a retry would repeat them); any other failure -> retry while `cluster.retries_on_failure`
    allows for this launch or job (`scope`) and the same step has not failed twice in a row."""
    if outcome is Outcome.FINISHED:
        return AfterAttempt(Action.DONE, 0)
    if outcome is Outcome.PREEMPTED:
        return AfterAttempt(Action.RESUME, 0, f"stopped at step {status.step} with a checkpoint")
    if outcome is Outcome.USER_ERROR:
        return AfterAttempt(Action.GIVE_UP, 2, f"error: {status.reason or 'a user error (see the rank logs)'}")
    if outcome is Outcome.DISK_FULL:  # the reason names the newest checkpoint
        return AfterAttempt(Action.GIVE_UP, 1, status.reason)
    if outcome is Outcome.CANCELLED:
        return AfterAttempt(Action.GIVE_UP, 130, "aborted with Ctrl-C twice (no save at the abort)")
    if outcome is Outcome.HUNG:  # the ranks' watchdog recorded it (trainers/watchdog.py)
        return AfterAttempt(Action.GIVE_UP, 1, f"training hung: {status.reason}")
    earlier = status.retried_steps(scope)
    verdict = retry_verdict(earlier, status.step, retries_allowed)
    if verdict.retry:
        return AfterAttempt(Action.RETRY, 1, f"{status.reason} at step {status.step}: retry {len(earlier) + 1} of "
                                             f"{retries_allowed} (cluster.retries_on_failure)", verdict)
    if verdict.repeated_step:
        return AfterAttempt(Action.GIVE_UP, 1, f"step {status.step} failed twice in a row: not retrying; fix the cause",
                            verdict)
    return AfterAttempt(Action.GIVE_UP, 1, verdict.why, verdict)


def record_after_failure(run_dir: str | Path, status: Status, scope: str, retries_allowed: int) -> AfterAttempt:
    """`after_attempt` for a failed attempt whose reason is recorded, with its record made: a
    retry joins the status's history (its scope's budget), a step that failed twice in a row
    joins the failure's reason."""
    after = after_attempt(Outcome.FAILED, status, retries_allowed, scope)
    if after.action is Action.RETRY:
        record_retry(run_dir, status.reason, status.step, scope=scope)
    elif after.verdict is not None and after.verdict.repeated_step:
        mark_failed(run_dir, f"{status.reason}; {after.verdict.why}")
    return after
