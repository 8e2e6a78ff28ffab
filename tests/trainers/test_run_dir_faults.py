"""Faults around the run dir as a user meets them: a checkpoint damaged after it was written,
two `hpctrain run` on one run dir, a launcher killed with kill -9."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.conftest import fill_disk as _fill
from tests.conftest import run_cli
from tests.trainers.helpers import (
    clm_spec,
    last_step,
    losses,
    send,
    start_run,
    trainer_pids,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.multiproc


def _spec(run, tok, corpus, steps=30):
    return clm_spec(run, tok, corpus, training__steps=steps, training__log_every=1, checkpoint__every_steps=5)


def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec), env={"HPCTRAIN_FAULT_FAIL_AT_STEP": "22"})  # a crash: steps 15 and 20 kept
    assert r.returncode == 1, r.stdout + r.stderr
    first = losses(run)  # steps 1..22, uninterrupted
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
    again = losses(run)
    assert sorted(again) == list(range(1, 31))
    assert all(again[s] == first[s] for s in range(16, 23))  # trained again from 15: the same losses


def test_a_crash_while_a_checkpoint_is_written_in_the_background_keeps_that_checkpoint(
        tmp_path, bpe_tokenizer, bpe_corpus):
    """Step 20's write is still in flight (held 3 s before it publishes) when step 21 crashes:
    the attempt ends only once step 20 is published, so a restart resumes from it."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec), env={"HPCTRAIN_FAULT_FAIL_AT_STEP": "21",
                                       "HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S": "20:3"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "checkpoint: step_00000020 written before the attempt ended" in r.stdout, r.stdout
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000020"  # published, and the older ones pruned
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000015", "step_00000020"]

    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step_00000020 (step 20" in r.stdout, r.stdout


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


def test_a_disk_that_fills_up_during_a_save(tmp_path, small_disk, bpe_tokenizer, bpe_corpus):
    """One line naming the file system and the newest complete checkpoint, exit 1, no retry; once
    space is freed the same command resumes from that checkpoint with the same losses."""
    run = small_disk / "run"
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=30,
                                                     training__log_every=1, checkpoint__every_steps=10,
                                                     cluster__retries_on_failure=2))
    proc = start_run(spec)
    wait_for(lambda: (run / "checkpoints" / "step_00000010" / "meta.json").is_file() and last_step(run) >= 11,
             timeout=120, what="the first checkpoint")
    ranks = trainer_pids(run)
    send(ranks, signal.SIGSTOP)  # held still while the disk fills: the next save (step 20) finds it full
    try:
        assert last_step(run) < 20
        _fill(small_disk / "filler", leave=200_000)  # room for metrics lines, not for a checkpoint
    finally:
        send(ranks, signal.SIGCONT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out
    lines = [x for x in out.splitlines() if "disk full" in x]
    assert len(lines) == 1 and str(run) in lines[0], out
    assert "newest complete checkpoint is step 10" in lines[0] and "free space" in lines[0], out
    assert out.splitlines()[-1] == lines[0], out  # the progress lines, then that one line: no report
    assert "Traceback" not in out and "Error" not in out and "retry" not in out, out
    assert not list((run / "checkpoints").glob(".step_*.tmp"))  # the failed save's folder is gone
    first = losses(run)
    assert trainer_pids(run) == []
    (small_disk / "filler").unlink()
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout and "(step 10," in r.stdout, r.stdout + r.stderr
    again = losses(run)
    assert sorted(again) == list(range(1, 31))
    assert all(again[s] == first[s] for s in first)  # the steps trained twice: the same losses


def _one_disk_full_line(out: str, run) -> str:
    lines = [x for x in out.splitlines() if "disk full" in x]
    assert len(lines) == 1 and str(run) in lines[0], out
    assert "free space, then the same command resumes from it" in lines[0], out
    assert out.rstrip("\n").splitlines()[-1] == lines[0], out  # the last thing said: no report after it
    assert "Traceback" not in out and "Error" not in out and "retry" not in out, out
    return lines[0]


def test_a_disk_that_fills_between_saves_and_before_a_launch(tmp_path, small_disk, bpe_tokenizer, bpe_corpus):
    """Filled to the last byte right after the first checkpoint is published (the next write is
    a metrics line or a log line, not a save), then still full when the same command is run
    again (the launcher's own writes: lock, reserve, logs): one line each time, exit 1, the
    newest checkpoint named; once space is freed the run resumes with the same losses."""
    run = small_disk / "run"
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=20,
                                                     training__log_every=1, checkpoint__every_steps=10))
    proc = start_run(spec)
    wait_for(lambda: (run / "checkpoints" / "step_00000010" / "meta.json").is_file(), timeout=120,
             what="the first checkpoint")
    ranks = trainer_pids(run)
    send(ranks, signal.SIGSTOP)
    try:
        _fill(small_disk / "filler", leave=0)
    finally:
        send(ranks, signal.SIGCONT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out
    assert "newest complete checkpoint is step 10" in _one_disk_full_line(out, run)
    first = losses(run)
    assert trainer_pids(run) == []

    _fill(small_disk / "filler 2", leave=0)  # what the ranks gave back is taken again
    r = run_cli("run", str(spec))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "newest complete checkpoint is step 10" in _one_disk_full_line(r.stdout + r.stderr, run)

    for f in small_disk.glob("filler*"):
        f.unlink()
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and "resuming from" in r.stdout and "(step 10," in r.stdout, r.stdout + r.stderr
    again = losses(run)
    assert sorted(again) == list(range(1, 21))
    assert all(again[s] == first[s] for s in first)
