"""Driving real Slurm jobs from tests."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from hpctrain.launcher.slurm import jobs_of, slurm_state


def job_id(run_dir: Path) -> str:
    return jobs_of(run_dir)[-1]["job_id"]


def state(job: str) -> dict:
    return slurm_state(job)


def wait_state(job: str, states: tuple[str, ...], timeout: float = 300, eligible: bool = True) -> dict:
    """Wait until the job is in one of `states`; make a requeued job eligible at once."""
    end = time.time() + timeout
    st: dict = {}
    pending_since = None
    while time.time() < end:
        st = state(job)
        if st.get("state") in states:
            return st
        if eligible and st.get("state") == "PENDING" and st.get("reason") == "BeginTime":
            # A requeued job waits ~2 minutes for its BeginTime; tests do not. But starting it
            # in the same second as the requeue fails it ("Job credential revoked": Slurm
            # compares credential times in whole seconds), so give the nodes a moment first.
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 2 and nodes_idle():
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=False)
        else:
            pending_since = None
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not reach {states} in {timeout}s; last: {st}")


def nodes_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.split()
    return bool(out) and all(s.rstrip("*") == "idle" for s in out)


def metrics_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in f.read_text().splitlines() if x.strip()]
    return max(steps, default=0)


def wait_step(run_dir: Path, k: int, timeout: float = 300) -> int:
    end = time.time() + timeout
    while time.time() < end:
        s = metrics_step(run_dir)
        if s >= k:
            return s
        time.sleep(0.2)
    raise AssertionError(f"no step {k} in {run_dir} after {timeout}s")


def preempt(job: str) -> None:
    subprocess.run(["scancel", "--signal=USR2", job], check=True)


def restart_count(job: str) -> int:
    return int(state(job).get("restarts") or 0)


def trainer_processes(run_dir: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"hpctrain.trainers.pretrain" in cmd and str(run_dir).encode() in cmd:
                out.append(int(p.name))
    return out
