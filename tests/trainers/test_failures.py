"""How an attempt ends is recorded by the process that sees it, and `status` says so."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import run_cli
from tests.trainers.helpers import (
    clm_spec,
    last_step,
    rank_of,
    start_run,
    trainer_pids,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.multiproc


def test_kill_9_of_one_rank_is_recorded_with_rank_signal_and_step(tmp_path, bpe_tokenizer, bpe_corpus):
    """A new user's check: kill -9 one rank of a local 2-rank run. `hpctrain run` names the rank
    and the signal and exits 1, nothing is left running, status.json and `hpctrain status` say
    "failed" at the step reached (not the step the attempt started at), and the same command
    resumes."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=40,
                                                     checkpoint__every_steps=5))
    proc = start_run(spec)
    wait_for(lambda: last_step(run) >= 12, timeout=120, what="step 12")
    victim = next(p for p in trainer_pids(run) if rank_of(p) == 1)
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "training failed: rank 1 killed by SIGKILL" in out, out[-2000:]
    wait_for(lambda: trainer_pids(run) == [], timeout=30, what="all ranks gone")
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and st["reason"] == "rank 1 killed by SIGKILL"
    assert st["step"] >= 12 and st["total_steps"] == 40
    status = run_cli("status", str(run))
    assert f"trainer: failed at step {st['step']}/40 (rank 1 killed by SIGKILL)" in status.stdout, status.stdout
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
