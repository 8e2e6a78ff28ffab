"""The real local Slurm cluster (slurm/start.sh). Absent: skip loudly, or fail under CI."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import run_cli
from tests.slurm.helpers import slurm_spec
from tests.trainers.helpers import losses, write_spec


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed (run slurm/start.sh as root to install and start it)"
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"Slurm does not answer: {r.stderr.strip()} (start it with slurm/start.sh)"
    # a node still finishing the previous test's job ("comp") is up as well
    up = [line for line in r.stdout.splitlines() if line.split()[1].rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if len(up) < 3:
        return f"the local cluster needs its three nodes up, sinfo says: {r.stdout.strip()!r}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true" or os.environ.get("HPCTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM REQUIRED (CI) BUT UNAVAILABLE: {problem}")
    pytest.skip(f"*** SKIPPING SLURM TESTS: {problem} ***")


@pytest.fixture(scope="module", autouse=True)
def one_slurm_module_at_a_time(tmp_path_factory):
    """tools/test.sh runs test modules on three pytest-xdist workers: the Slurm modules take turns,
    since they share the three-node cluster (a job waiting for nodes that another test's job holds
    could run past its test's timeouts)."""
    lock = tmp_path_factory.getbasetemp().parent / "slurm-tests.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, bpe_tokenizer, bpe_corpus):
    """The same spec run locally, uninterrupted, with the same world size (2 ranks); one run
    for every Slurm test module."""
    d = tmp_path_factory.mktemp("localref")
    spec = slurm_spec(d / "run", bpe_tokenizer, bpe_corpus, steps=60)
    spec["cluster"] = {"procs_per_node": 2}
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    return losses(d / "run")


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(tmp_path):
    """A failed test can leave its job running (say, a node task waiting for a peer): cancel the
    jobs started under this test's folder, so that the next test does not wait for their nodes."""
    yield
    if shutil.which("squeue") is None:
        return
    left = _queued_under(tmp_path)
    if left:
        print(f"cancelling job(s) {', '.join(left)} left by the test")
        subprocess.run(["scancel", *left], check=False, timeout=60)
        end = time.time() + 120
        while _queued_under(tmp_path) and time.time() < end:
            time.sleep(1)


def _queued_under(folder) -> list[str]:
    """Ids of the queued or running jobs whose command lies under `folder`."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if str(folder) in line]
