"""Driving real Slurm jobs from tests."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from hpctrain.launcher.slurm import jobs_of, slurm_state
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, losses, wait_for, write_spec


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


def slurm_spec(run_dir: Path, tok: str, corpus: str, steps: int = 40, **cluster) -> dict:
    spec = clm_spec(run_dir, tok, corpus, training__steps=steps)
    # both CPUs of a node and one thread: the two "nodes" of the local cluster share this machine's
    # cores, and task/affinity would put both ranks on CPU 0; one thread as in the local reference
    spec["cluster"] = {"executor": "slurm", "nodes": 2, "procs_per_node": 1, "time_min": 10,
                       "max_requeues": 3, "cpus_per_task": 2, "env": {"OMP_NUM_THREADS": "1"}, **cluster}
    return spec


def submit(spec_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = run_cli("submit", str(spec_path), *extra, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def preempted_run(tmp_path, tok, corpus, preemptions: int, first_at: int = 5, monitor: dict | None = None,
                  **cluster):
    run = tmp_path / "run"
    raw = slurm_spec(run, tok, corpus, steps=60, **cluster)
    if monitor:
        raw["monitor"] = monitor
    spec = write_spec(tmp_path / "s.yaml", raw)
    submit(spec)
    job = job_id(run)
    for i in range(preemptions):
        preempt_while_training(run, job, attempt=i, min_step=first_at + 10 * i)
        wait_for(lambda i=i: restart_count(job) >= i + 1, timeout=180, what=f"requeue {i + 1}")
    return run, job


def preempt_while_training(run: Path, job: str, attempt: int, min_step: int) -> None:
    """USR2 once this attempt's trainers are at work (its node task started, new steps logged)."""
    wait_state(job, ("RUNNING",))
    logs = lambda: (run / "slurm").glob(f"{job}_0_log.out")  # noqa: E731
    wait_for(lambda: any(f"restart {attempt})" in p.read_text() for p in logs()), what=f"attempt {attempt}")
    resumed_at = json.loads((run / "status.json").read_text())["step"] if attempt else 0
    wait_step(run, max(min_step, resumed_at + 2))
    preempt(job)


def completed_after_one_requeue(job: str, what: str = "the requeue") -> None:
    """The job is requeued (once) and then completes."""
    wait_for(lambda: restart_count(job) >= 1, timeout=180, what=what)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED" and st["restarts"] == "1", st


def zero3_preempted_once_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus) -> Path:
    """DeepSpeed ZeRO-3 on 2 nodes x 1 rank: USR2 once, every rank saves its shards, the job is
    requeued and finishes with the losses of an uninterrupted local 2-rank ZeRO-3 run."""
    return sharded_preempted_once_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus,
                                                  {"type": "deepspeed", "zero_stage": 3}, "ds")


def sharded_preempted_once_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus, engine: dict,
                                           shards: str) -> Path:
    """A sharding engine on 2 nodes x 1 rank: USR2 once, every rank saves its shards (into
    `shards/` of the step folder), the job is requeued and finishes with the losses of an
    uninterrupted local 2-rank run of the same engine."""
    ref_spec = slurm_spec(tmp_path / "ref", bpe_tokenizer, bpe_corpus, steps=30)
    ref_spec.update(cluster={"procs_per_node": 2}, engine=engine)
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", ref_spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    spec = slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=30)
    spec["engine"] = engine
    submit(write_spec(tmp_path / "s.yaml", spec))
    job = job_id(run)
    preempt_while_training(run, job, attempt=0, min_step=5)
    completed_after_one_requeue(job)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts and all((run / "checkpoints" / c / shards).is_dir() for c in ckpts)
    assert losses(run) == losses(tmp_path / "ref")
    assert trainer_processes(run) == []
    return run
