"""`hpctrain run`: one machine, torchrun with the spec's process count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpctrain.launcher.attempt import (
    Action,
    Outcome,
    after_attempt,
    attempt_outcome,
    record_after_failure,
)
from hpctrain.launcher.contract.diskfull import keep_reserve
from hpctrain.launcher.contract.rundir import RunDir, aborted, next_free_path
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.launcher.contract.states import (
    State,
    mark_cancelled,
    mark_failed,
    read_status,
)
from hpctrain.launcher.node import (
    ENV_ROOM,
    build_torchrun_command,
    failure_reason,
    forks_ranks,
    run_torchrun,
)


def torch_env(nproc: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # ranks load local folders only: a Hub id was pinned and downloaded at launch (hub.py)
    env["PYTHONUNBUFFERED"] = "1"
    return env


RESUME_HINT = "hpctrain: the same command resumes from the newest checkpoint"


def run_local(spec: RunSpec, run_dir: Path, log=print) -> int:
    """Attempts on this machine until the run is done, stopped, or the failure policy gives up
    (launcher/attempt.py: `after_attempt`); the command's exit code."""
    if spec.cluster.nodes != 1:
        log(
            f"note: cluster.nodes={spec.cluster.nodes}; a local run uses this machine only "
            f"({spec.cluster.procs_per_node} process(es))"
        )
    scope = f"local launch {os.getpid()}"
    while True:
        outcome, logs = _attempt(spec, run_dir, log)
        status = read_status(run_dir)
        if outcome is Outcome.FAILED:
            after = record_after_failure(run_dir, status, scope, spec.cluster.retries_on_failure)
        else:
            after = after_attempt(outcome, status, spec.cluster.retries_on_failure, scope)
        if after.action is Action.DONE:
            log(f"done: {spec.name} trained {status.step} steps")
            log(f"  checkpoints: {run_dir / 'checkpoints'}\n  metrics:     {run_dir / 'metrics.jsonl'}")
            if spec.export.enabled:
                log(f"  export:      {run_dir / 'export'}")
        elif after.action is Action.RESUME:
            log(f"{after.line}; run the same command to resume")
        elif after.action is Action.RETRY:
            log(f"hpctrain: {after.line}: resuming from the newest checkpoint")
            continue
        elif outcome is Outcome.CANCELLED:
            mark_cancelled(run_dir, after.line)
        elif outcome is Outcome.HUNG:
            print(f"hpctrain: {after.line}; stacks of every rank are in their logs under {logs}", file=sys.stderr)
        elif after.line:
            print(f"hpctrain: {after.line}", file=sys.stderr)
        if after.action is Action.GIVE_UP and outcome in (Outcome.HUNG, Outcome.FAILED):
            print(RESUME_HINT, file=sys.stderr)
        return after.exit_code


def _attempt(spec: RunSpec, run_dir: Path, log) -> tuple[Outcome, Path]:
    """One torchrun launch: what it ended as, and where its rank logs are. A failure the trainer
    did not record itself is recorded here, with torchrun's account of it; its report (and the
    end of every rank log with a traceback) is printed."""
    keep_reserve(run_dir)  # OSError ENOSPC here: the disk is full before any rank starts (cli)
    logs = next_attempt_logs(run_dir)
    fork = forks_ranks(spec.cluster.rank_start)
    cmd = build_torchrun_command(
        str(run_dir), spec.cluster.procs_per_node, module=spec.trainer_module, log_dir=str(logs),
        fork_ranks=fork,
    )
    env = {**torch_env(spec.cluster.procs_per_node), **(ENV_ROOM if fork else {})}
    tail: list[str] = []
    rc = run_torchrun(cmd, run_dir, env=env, log=log, stderr_tail=tail)
    status = read_status(run_dir)
    outcome = attempt_outcome(rc, status, aborted(run_dir))
    if outcome is Outcome.FAILED:
        reason = failure_reason(rc, tail)
        if status.state != State.FAILED:  # a reason the trainer recorded itself wins
            mark_failed(run_dir, reason)
        print(f"hpctrain: training failed: {reason} (torchrun exit code {rc}) at step "
              f"{read_status(run_dir).step}; rank logs: {logs}", file=sys.stderr)
        for path, lines in failure_tails(logs):
            print(f"--- last lines of {path}:", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)
    return outcome, logs


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
