"""`hpctrain sweep` on the real local Slurm cluster: a job per point, at most N at once, one
point preempted and requeued; every point ends with the losses of the same sweep run locally."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import run_cli
from tests.slurm.helpers import preempt_while_training, restart_count, slurm_spec, wait_state
from tests.trainers.helpers import losses, wait_for, write_spec

pytestmark = pytest.mark.usefixtures("slurm_cluster")
OVER = "training.lr=1e-3,2e-3,3e-3"
POINTS = ["lr=1e-3", "lr=2e-3", "lr=3e-3"]


def _spec(tmp_path, name, tok, corpus, **cluster):
    s = slurm_spec(tmp_path / name, tok, corpus, steps=40, nodes=1, **cluster)
    s["name"] = "lrs"
    s["checkpoint"] = {"every_steps": 4}
    return write_spec(tmp_path / f"{name}.yaml", s)


def test_a_sweep_submits_a_job_per_point_at_most_two_at_once_and_survives_a_preemption(tmp_path, bpe_tokenizer,
                                                                                        bpe_corpus):
    ref = _spec(tmp_path, "local", bpe_tokenizer, bpe_corpus)
    raw = yaml.safe_load(ref.read_text())
    raw["cluster"] = {"procs_per_node": 1, "env": {"OMP_NUM_THREADS": "1"}}  # the same points on this machine
    r = run_cli("sweep", str(write_spec(ref, raw)), "--over", OVER, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr

    spec = _spec(tmp_path, "slurm", bpe_tokenizer, bpe_corpus)
    r = run_cli("sweep", str(spec), "--over", OVER, "--max-parallel", "2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = re.findall(r"point (\S+): submitted job (\d+)", r.stdout)
    assert [p for p, _ in jobs] == POINTS
    ids = [j for _, j in jobs]
    assert f"point {POINTS[2]}: submitted job {ids[2]}: 1 node(s) x 1 process(es), after job {ids[0]}" in r.stdout

    root = tmp_path / "slurm"
    first = root / POINTS[0]
    preempt_while_training(first, ids[0], attempt=0, min_step=3)
    wait_for(lambda: restart_count(ids[0]) >= 1, timeout=180, what="the requeue of the first point")
    for job in ids:
        st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
        assert st["state"] == "COMPLETED", st
    assert restart_count(ids[0]) == 1
    for name in POINTS:
        assert losses(root / name) == losses(tmp_path / "local" / name), name
    rep = run_cli("status", str(root)).stdout
    assert [line.split()[1] for line in rep.splitlines() if line.startswith("lr=")] == ["finished"] * 3
