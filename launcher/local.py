"""`hpctrain run`: one machine, torchrun with the spec's process count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpctrain.launcher.attempt import Outcome, attempt_outcome, give_up, retry_verdict
from hpctrain.launcher.contract.diskfull import keep_reserve
from hpctrain.launcher.contract.rundir import RunDir, aborted, next_free_path
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.launcher.contract.states import (
    State,
    mark_cancelled,
    mark_failed,
    read_status,
    record_retry,
)
from hpctrain.launcher.node import build_torchrun_command, failure_reason, run_torchrun


def torch_env(nproc: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_local(spec: RunSpec, run_dir: Path, log=print) -> int:
    if spec.cluster.nodes != 1:
        log(
            f"note: cluster.nodes={spec.cluster.nodes}; a local run uses this machine only "
            f"({spec.cluster.procs_per_node} process(es))"
        )
    failed_steps: list[int] = []
    while True:
        rc = _attempt(spec, run_dir, log)
        if rc != RETRY:
            return rc
        status = read_status(run_dir)
        step = status.get("step", 0)
        verdict = retry_verdict(failed_steps, step, spec.cluster.retries_on_failure)
        if not verdict.retry:
            give_up(run_dir, verdict, status.get("reason", ""))
            if verdict.repeated_step:
                print(f"hpctrain: step {step} failed twice in a row: not retrying; fix the cause", file=sys.stderr)
            elif verdict.why:
                print(f"hpctrain: {verdict.why}", file=sys.stderr)
            print(RESUME_HINT, file=sys.stderr)
            return 1
        failed_steps.append(step)
        record_retry(run_dir, status.get("reason", ""), step, scope=f"local launch {os.getpid()}")
        log(f"hpctrain: retry {len(failed_steps)} of {spec.cluster.retries_on_failure} "
            "(cluster.retries_on_failure): resuming from the newest checkpoint")


RETRY = -1000  # _attempt's answer for "failed; a retry may help"
RESUME_HINT = "hpctrain: the same command resumes from the newest checkpoint"


def _attempt(spec: RunSpec, run_dir: Path, log) -> int:
    """One torchrun launch: its exit code for the user, or RETRY when it failed for a reason
    other than a user error (the reason and step are then in status.json)."""
    keep_reserve(run_dir)  # OSError ENOSPC here: the disk is full before any rank starts (cli)
    logs = next_attempt_logs(run_dir)
    cmd = build_torchrun_command(
        str(run_dir), spec.cluster.procs_per_node, module=spec.trainer_module, log_dir=str(logs)
    )
    tail: list[str] = []
    rc = run_torchrun(cmd, run_dir, env=torch_env(spec.cluster.procs_per_node), log=log, stderr_tail=tail)
    status = read_status(run_dir)
    outcome = attempt_outcome(rc, status, aborted(run_dir))
    if outcome is Outcome.FINISHED:
        log(f"done: {spec.name} trained {status.get('step')} steps")
        log(f"  checkpoints: {run_dir / 'checkpoints'}\n  metrics:     {run_dir / 'metrics.jsonl'}")
        if spec.export.enabled:
            log(f"  export:      {run_dir / 'export'}")
        return 0
    if outcome is Outcome.PREEMPTED:
        log(
            f"stopped at step {status.get('step')} with a checkpoint; run the same command to resume"
        )
        return 0
    if outcome is Outcome.HUNG:  # the ranks' watchdog recorded it (trainers/watchdog.py): not retried
        print(f"hpctrain: training hung: {status.get('reason')}; stacks of every rank are in their logs "
              f"under {logs}", file=sys.stderr)
        print(RESUME_HINT, file=sys.stderr)
        return 1
    if outcome is Outcome.CANCELLED:  # Ctrl-C twice: the user ended it without a save
        mark_cancelled(run_dir, "aborted with Ctrl-C twice (no save at the abort)")
        return 130
    if outcome is Outcome.DISK_FULL:  # one line (it names the newest checkpoint); a retry cannot help
        print(f"hpctrain: {status.get('reason')}", file=sys.stderr)
        return 1
    if outcome is Outcome.USER_ERROR:  # the same command would fail the same way: no hint, no retry
        print(f"hpctrain: error: {status.get('reason', 'see the rank logs in ' + str(logs))}",
              file=sys.stderr)
        return 2
    reason = failure_reason(rc, tail)
    if status.get("state") != State.FAILED:  # a reason the trainer recorded itself wins
        mark_failed(run_dir, reason)
    print(f"hpctrain: training failed: {reason} (torchrun exit code {rc}) at step "
          f"{read_status(run_dir).get('step', 0)}; rank logs: {logs}", file=sys.stderr)
    for path, lines in failure_tails(logs):
        print(f"--- last lines of {path}:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
    return RETRY


def next_attempt_logs(run_dir: Path) -> Path:
    """RUN_DIR/logs/local.N for this launch (N counts launches: every attempt keeps its logs)."""
    return next_free_path(RunDir(run_dir).local_logs)


def failure_tails(logs: Path, n: int = 15) -> list[tuple[Path, list[str]]]:
    """The end of every rank's stderr that holds a traceback (what a user needs after a crash)."""
    out = []
    for path in sorted(logs.rglob("stderr.log")):
        text = path.read_text(errors="replace")
        if "Traceback" in text or "Error" in text:
            out.append((path, text.splitlines()[-n:]))
    return out
