"""The preemption tests again with `ProctrackType=proctrack/cgroup`: Slurm's USR2 reaches only
the node task (the workers get nothing from Slurm), the path of most production clusters."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.helpers import (
    completed_after_one_requeue,
    job_id,
    preempt,
    preempted_run,
    slurm_spec,
    submit,
    trainer_processes,
    wait_state,
    wait_step,
    zero3_preempted_once_resumes_bitwise,
)
from tests.trainers.helpers import losses, write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
STATE = os.environ.get("HPCTRAIN_SLURM_STATE", "/tmp/hpctrain-slurm")


def _proctrack() -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return next((line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("ProctrackType")), "")


def _start(proctrack: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / "start.sh"), STATE], capture_output=True, text=True,
                          env={**os.environ, "HPCTRAIN_SLURM_PROCTRACK": proctrack}, timeout=180)


@pytest.fixture(scope="module")
def cgroup_cluster():
    """The local cluster restarted with proctrack/cgroup by slurm/start.sh; linuxproc again after."""
    if not (Path(STATE) / "proctrack").is_file() or os.geteuid() != 0:
        problem = f"the running cluster was not started by slurm/start.sh {STATE} as root: cannot switch it"
    elif not Path("/sys/fs/cgroup/freezer").is_dir():
        problem = "no cgroup v1 freezer hierarchy on this machine (/sys/fs/cgroup/freezer): proctrack/cgroup cannot run"
    else:
        r = _start("cgroup")
        problem = None if r.returncode == 0 and _proctrack() == "proctrack/cgroup" else (
            f"slurm/start.sh with HPCTRAIN_SLURM_PROCTRACK=cgroup failed: {r.stderr.strip()[-500:]}")
    if problem:
        _start("linuxproc")
        if os.environ.get("CI") == "true":
            pytest.fail(f"PROCTRACK/CGROUP REQUIRED (CI) BUT UNAVAILABLE: {problem}")
        pytest.skip(f"*** SKIPPING PROCTRACK/CGROUP TESTS: {problem} ***")
    yield
    r = _start("linuxproc")
    assert r.returncode == 0 and _proctrack() == "proctrack/linuxproc", r.stderr


def test_preemption_under_cgroup_resumes_bitwise(cgroup_cluster, tmp_path, bpe_tokenizer, bpe_corpus,
                                                  local_reference):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (extra 'wandb')") and {"mode": "offline"}
    run, job = preempted_run(tmp_path, bpe_tokenizer, bpe_corpus, preemptions=1, monitor={"wandb": wandb})
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED" and st["restarts"] == "1"
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    # the workers heard nothing from Slurm: the node task's stop file stopped them
    assert "preempted (stop file)" in log and "preempted (SIGUSR2)" not in log, log[-3000:]
    assert losses(run) == local_reference
    assert trainer_processes(run) == []
    # one W&B run across the requeue: two offline segments (one per attempt), one id
    from hpctrain.launcher.wandb_files import merged_history, offline_segments, read_run

    segments = offline_segments(run)
    assert len(segments) == 2
    assert {read_run(s)["id"] for s in segments} == {(run / "wandb_id").read_text().strip()}
    assert {s: r["loss"] for s, r in merged_history(run).items() if "loss" in r} == local_reference


@pytest.mark.deepspeed
def test_zero3_preemption_under_cgroup_resumes_bitwise(cgroup_cluster, tmp_path, bpe_tokenizer, bpe_corpus):
    """DeepSpeed ZeRO-3 on 2 nodes x 1 rank (run here only: the stricter signal path)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (extra 'deepspeed')")
    zero3_preempted_once_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus)


def test_preemption_inside_a_container_resumes_bitwise(cgroup_cluster, tmp_path, bpe_tokenizer, bpe_corpus,
                                                       local_reference):
    """cluster.container with bubblewrap, the stand-in runtime: the ranks run in a PID namespace of
    their own where Slurm's commands do not exist. Slurm's USR2 reaches only the node task, on the
    host; the ranks learn of the stop from the run dir, save, and the host side requeues the job,
    which resumes bitwise."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=60,
                                                      container={"runtime": "bubblewrap"}))
    submit(spec)
    job = job_id(run)
    wait_state(job, ("RUNNING",))
    wait_step(run, 5)
    inside = [p for p in trainer_processes(run) if not Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"bwrap")]
    assert inside, "no trainer processes"
    scontrol = shutil.which("scontrol")
    for pid in inside:  # torchrun and its ranks: in a PID namespace, and scontrol is not a program there
        nspid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid"))
        assert len(nspid.split()) == 3, nspid
        assert stat.S_ISCHR(os.stat(f"/proc/{pid}/root{scontrol}").st_mode)
    preempt(job)
    completed_after_one_requeue(job)
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    assert "hpctrain: in a container: bwrap --dev-bind / / --unshare-pid" in log, log[-3000:]
    assert "preempted (stop file)" in log and "preempted (SIGUSR2)" not in log, log[-3000:]
    assert losses(run) == local_reference
    assert trainer_processes(run) == []
