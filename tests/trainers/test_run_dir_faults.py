"""Faults around the run dir as a user meets them: a checkpoint damaged after it was written,
two `hpctrain run` on one run dir, a launcher killed with kill -9."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.conftest import run_cli
from tests.trainers.helpers import (
    clm_spec,
    last_step,
    losses,
    start_run,
    trainer_pids,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.multiproc


def _spec(run, tok, corpus, steps=30):
    return clm_spec(run, tok, corpus, training__steps=steps, training__log_every=1, checkpoint__every_steps=5)


def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    ref = tmp_path / "ref"
    assert run_cli("run", str(write_spec(tmp_path / "ref.yaml", _spec(ref, bpe_tokenizer, bpe_corpus)))).returncode == 0
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec), env={"HPCTRAIN_FAULT_FAIL_AT_STEP": "22"})  # a crash: steps 15 and 20 kept
    assert r.returncode == 1, r.stdout + r.stderr
    ck = run / "checkpoints"
    kept = shutil.copytree(ck / "step_00000015", tmp_path / "kept-15")
    newest = ck / "step_00000020" / "model.pt"
    os.truncate(newest, newest.stat().st_size // 2)  # a bad copy
    older = ck / "step_00000015" / "optim.pt"
    data = bytearray(older.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other contents
    older.write_bytes(bytes(data))

    r = run_cli("run", str(spec))  # nothing whole: refused, naming the newest damaged file
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no checkpoint is whole" in r.stderr and "step_00000020" in r.stderr and "model.pt has" in r.stderr
    assert "Traceback" not in r.stderr and "resumes from the newest checkpoint" not in r.stderr

    shutil.rmtree(ck / "step_00000015")
    shutil.copytree(kept, ck / "step_00000015")  # the older one restored
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpoint step_00000020 is damaged (model.pt has" in r.stdout and "skipped" in r.stdout
    assert "resuming from" in r.stdout and "step_00000015 (step 15" in r.stdout, r.stdout
    assert losses(run) == losses(ref)  # steps 16.. trained again from 15: the uninterrupted losses


def test_a_second_run_on_a_live_run_dir_is_refused_and_a_dead_holder_is_taken_over(tmp_path, bpe_tokenizer,
                                                                                   bpe_corpus):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, steps=40))
    first = start_run(spec)
    wait_for(lambda: last_step(run) >= 6, timeout=120, what="step 6")
    second = run_cli("run", str(spec), timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"another run holds this run dir: hpctrain run (pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    os.kill(first.pid, signal.SIGKILL)  # the launcher dies; its torchrun and ranks die with it
    first.communicate(timeout=60)
    wait_for(lambda: trainer_pids(run) == [], timeout=60, what="the ranks to end")
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"hpctrain run (pid {first.pid}" in r.stdout and "is gone (no longer running): taking it over" in r.stdout
    assert "resuming from" in r.stdout and sorted(losses(run)) == list(range(1, 41))
    assert not (run / "control" / "lock").exists()  # released at the end
