"""Continued pretraining through `hpctrain run`: real torchrun, 2 gloo ranks on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.launcher.contract.checkpoints import complete_checkpoints
from tests.conftest import run_cli
from tests.trainers.helpers import (
    clm_spec,
    last_step,
    losses,
    rank_of,
    send,
    start_run,
    trainer_pids,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bpe_tokenizer, bpe_corpus):
    """An uninterrupted 2-rank run of 30 steps: the losses every resume must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    spec = write_spec(d / "spec.yaml", clm_spec(d / "run", bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "run", r


def test_run_trains_checkpoints_and_exports(reference):
    run, r = reference
    assert "step 30/30" in r.stdout and "validation: loss" in r.stdout
    assert "export:" in r.stdout
    ref = losses(run)
    assert sorted(ref) == list(range(1, 31))
    assert ref[30] < ref[1] - 0.3  # it learns
    # keep_last 2: only the two newest complete checkpoints remain
    assert [s for s, _ in complete_checkpoints(run)] == [20, 30]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "export" / "model.safetensors").is_file()


def _interrupt_and_resume(tmp_path, bpe_tokenizer, bpe_corpus, how: str, resume_procs: int = 2):
    spec = write_spec(tmp_path / "spec.yaml", clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus))
    run = tmp_path / "run"
    proc = start_run(spec)
    wait_for(lambda: last_step(run) >= 4, what="step 4")
    if how == "launcher-signal":  # what Ctrl-C or a node task receiving USR2 does
        proc.send_signal(signal.SIGINT)
    else:  # "everyone": Slurm with proctrack/linuxproc signals torchrun and every worker
        torchrun = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and b"torch.distributed.run" in (p / "cmdline").read_bytes()
            and str(run).encode() in (p / "cmdline").read_bytes()
        ]
        send(torchrun + trainer_pids(run), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted" in out and "resumable" in out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted"
    stopped = status["step"]
    assert 4 <= stopped < 30
    assert trainer_pids(run) == []  # nothing outlives the run
    extra = ["--set", f"cluster.procs_per_node={resume_procs}"] if resume_procs != 2 else []
    r = run_cli("run", str(spec), *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped:08d}'}" in r.stdout
    return run, stopped


@pytest.mark.parametrize("how", ["launcher-signal", "signal-to-everyone"])
def test_resume_after_a_stop_signal_reproduces_the_losses_bitwise(
    tmp_path, bpe_tokenizer, bpe_corpus, reference, how
):
    ref = losses(reference[0])
    run, stopped = _interrupt_and_resume(tmp_path, bpe_tokenizer, bpe_corpus, how)
    got = losses(run)
    assert sorted(got) == list(range(1, 31))
    for step in range(stopped + 1, 31):
        assert got[step] == ref[step], (step, got[step], ref[step])  # bitwise: same floats


def test_training_goes_on_while_a_checkpoint_is_written_and_a_stop_waits_for_it(
    tmp_path, bpe_tokenizer, bpe_corpus, reference
):
    """Background saves: the step-10 write is held 8 s before its publish. Training goes on
    meanwhile (later steps logged, nothing published); Ctrl-C then saves once more, after the
    write in flight is published (never overlapping it), and the resumed run reproduces
    every loss bitwise."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus))
    proc = start_run(spec, env={"HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S": "10:8"})
    wait_for(lambda: (run / "checkpoints" / ".step_00000010.tmp").exists(), what="the step-10 save")
    wait_for(lambda: last_step(run) >= 12, timeout=8, what="steps trained during the write")
    assert complete_checkpoints(run) == [] and not (run / "checkpoints" / "latest").exists()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "resumable" in out, out
    stopped = json.loads((run / "status.json").read_text())["step"]
    assert [s for s, _ in complete_checkpoints(run)] == [10, stopped] and stopped >= 12
    assert out.index("step_00000010 written") < out.index(f"checkpoint: {run / 'checkpoints'}/step_{stopped:08d}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    blocked = {r["step"]: r["ckpt_save_s"] for r in recs if "ckpt_save_s" in r}
    assert blocked[10] < 4 and max(r["ckpt_write_s"] for r in recs if "ckpt_write_s" in r) >= 8
    r = run_cli("run", str(spec))
    assert r.returncode == 0 and f"step_{stopped:08d}" in r.stdout, r.stdout + r.stderr
    assert losses(run) == losses(reference[0])


def test_resume_on_fewer_ranks_continues_the_same_samples(
    tmp_path, bpe_tokenizer, bpe_corpus, reference
):
    ref = losses(reference[0])
    run, stopped = _interrupt_and_resume(
        tmp_path, bpe_tokenizer, bpe_corpus, "launcher-signal", resume_procs=1
    )
    got = losses(run)
    for step in range(stopped + 1, 31):
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (step, got[step], ref[step])


def _rank_signals(run: Path) -> set[tuple[str, ...]]:
    """The live ranks' blocked, ignored and caught signal masks (/proc/PID/status)."""
    out = set()
    for pid in trainer_pids(run):
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        out.add(tuple(status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")))
    return out


def _rank_processes(run: Path) -> list[tuple[list[bytes], dict[bytes, bytes], bool, bytes]]:
    """Each live rank's command line, environment, session and parent's command line (/proc)."""
    out = []
    for pid in trainer_pids(run):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert Path(f"/proc/{pid}/comm").read_text().strip() == Path(sys.executable).name[:15]  # top, pgrep
        out.append((cmd, env, os.getsid(pid) == pid, Path(f"/proc/{parent}/cmdline").read_bytes()))
    return out


def test_forked_ranks_look_like_execd_ones_and_either_start_resumes_the_other_bitwise(
    tmp_path, bpe_tokenizer, bpe_corpus, reference
):
    """cluster.rank_start: fork (this CPU machine's default) against exec (a fresh interpreter
    per rank, GPU nodes' default). Either way each rank shows in /proc what an exec'd rank
    shows: its own command line, torchrun's environment for it (RANK...), a session of its own,
    torchrun as its parent, the same signals blocked, ignored and caught. A forked run stopped
    with Ctrl-C and resumed with exec gives the reference's losses bitwise."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus,
                                                       cluster__rank_start="fork"))
    rank_cmd = [sys.executable.encode(), b"-u", b"-m", b"hpctrain.trainers.pretrain", b"--run-dir",
                str(run).encode(), b"--echo-to-log"]
    seen, signals = {}, {}
    for start in ("fork", "exec"):
        done = last_step(run)
        # idle time per step (a test switch; the numbers are unchanged): a window to look at the ranks
        proc = start_run(spec, "--set", f"cluster.rank_start={start}", env={"HPCTRAIN_FAULT_SLOW_STEP_S": "0.2"})
        wait_for(lambda done=done: last_step(run) >= done + 2, what=f"2 steps after {done}")
        ranks = _rank_processes(run)
        assert len(ranks) == 2, ranks
        for cmd, env, own_session, parent in ranks:
            assert cmd == rank_cmd, cmd
            assert env[b"WORLD_SIZE"] == b"2" and env[b"LOCAL_RANK"] == env[b"RANK"]
            assert b"HPCTRAIN_ENV_ROOM" not in env and own_session
            assert b"torch.distributed.run" in parent
        seen[start] = {env[b"RANK"] for _, env, _, _ in ranks}, {b"warm_start" in p for *_, p in ranks}
        signals[start] = _rank_signals(run)
        if start == "fork":
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        if start == "fork":
            assert "preempted" in out and last_step(run) < 30, out
    assert seen == {"fork": ({b"0", b"1"}, {True}), "exec": ({b"0", b"1"}, {False})}
    assert signals["fork"] == signals["exec"] and len(signals["exec"]) == 1, signals
    blocked, _, caught = next(iter(signals["exec"]))
    assert int(caught, 16) & (1 << (signal.SIGUSR2 - 1)) and int(blocked, 16) == 0  # the trainer's USR2
    ref, got = losses(reference[0]), losses(run)
    assert sorted(got) == list(range(1, 31))
    assert got == ref  # every step: those of the forked attempt and those resumed with exec
    assert "resuming from" in out


def test_kill_9_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, bpe_tokenizer, bpe_corpus, reference
):
    spec = write_spec(tmp_path / "spec.yaml", clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus))
    run = tmp_path / "run"
    proc = start_run(spec, env={"HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S": "20:20"})
    wait_for(lambda: (run / "checkpoints" / ".step_00000020.tmp").exists(), what="the step-20 save")
    # rank 0 is the one that commits (rename + `latest`): kill it inside the save
    victim = next(p for p in trainer_pids(run) if rank_of(p) == 0)
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    wait_for(lambda: trainer_pids(run) == [], timeout=30, what="all ranks gone")
    assert [s for s, _ in complete_checkpoints(run)] == [10]
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "step_00000010" in r.stdout
    ref, got = losses(reference[0]), losses(run)
    for step in range(11, 31):
        assert got[step] == ref[step]


def test_exported_model_gives_the_trainers_validation_loss(reference, bpe_corpus):
    """Load the export with plain transformers; its loss on the validation samples equals the trainer's."""
    from transformers import AutoModelForCausalLM

    from hpctrain.launcher.contract.corpus import open_corpus
    from hpctrain.trainers.data.sampler import PackedSource

    run, _ = reference
    model = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    src = PackedSource(open_corpus(bpe_corpus).split("valid"), 32)
    val = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x
    ]
    trainer_loss = val[-1]["val_loss"]
    # the trainer's eval: eval_batches (4) micro-batches of 2 per rank, samples strided over 2 ranks
    per_rank = []
    for rank in range(2):
        idx = list(range(rank, min(src.num_samples, 4 * 2 * 2), 2))
        ls = []
        for i in range(0, len(idx), 2):
            toks = torch.from_numpy(
                np.stack([src.sample(k) for k in idx[i : i + 2]]).astype(np.int64)
            )
            with torch.no_grad():
                logits = model(input_ids=toks[:, :-1]).logits
            ls.append(
                float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)), toks[:, 1:].reshape(-1)
                    )
                )
            )
        per_rank.append(sum(ls) / len(ls))
    assert math.isclose(sum(per_rank) / 2, trainer_loss, rel_tol=1e-5)


def test_relaunch_with_a_changed_spec_is_refused_and_no_resume_starts_elsewhere(
    reference, tmp_path, bpe_tokenizer, bpe_corpus
):
    run, _ = reference
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec), "--set", "training.lr=0.5")
    assert r.returncode == 2
    assert "training.lr changed" in r.stderr and "--no-resume" in r.stderr
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = run_cli(
        "run", str(spec), "--set", "training.steps=2", "--set", "training.lr=0.5", "--no-resume"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"starting over in {run}.1" in r.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost
    assert sorted(losses(Path(f"{run}.1"))) == [1, 2]


def test_more_steps_on_a_finished_run_continue_from_its_checkpoint(
    reference, tmp_path, bpe_tokenizer, bpe_corpus
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus))
    r = run_cli("run", str(spec), "--set", "training.steps=32", "--set", "cluster.procs_per_node=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "step_00000030" in r.stdout and "step 32/32" in r.stdout


def test_direct_trainer_invocation_documents_itself():
    r = subprocess.run(
        [sys.executable, "-m", "hpctrain.trainers.pretrain", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "torchrun" in r.stdout


def test_deadline_saves_and_stops_ahead_of_the_time_limit(tmp_path, bpe_tokenizer, bpe_corpus):
    """No signal ever comes: the trainer itself stops when the next step plus a save would not fit."""
    import time

    from hpctrain.launcher.contract.rundir import freeze_run_dir
    from hpctrain.launcher.contract.spec import spec_from_dict

    spec = spec_from_dict(clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, training__steps=100_000))
    spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"procs_per_node": 1})})
    _, run = freeze_run_dir(spec)
    deadline = time.time() + 60  # room for a start-up slowed by the other test worker's runs
    r = subprocess.run(  # steps made slow and idle: the minute is not a core burnt
        [sys.executable, "-m", "hpctrain.trainers.pretrain", "--run-dir", str(run), "--deadline", str(deadline)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HPCTRAIN_FAULT_SLOW_STEP_S": "0.2"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() < deadline + 1
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and status["reason"] == "deadline"
    assert complete_checkpoints(run)[-1][0] == status["step"]
    assert "preempted (deadline)" in r.stdout
