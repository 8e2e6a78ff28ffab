"""How an attempt ends is recorded by the process that sees it, `status` says so, and what
each logged step measures."""

from __future__ import annotations

import json
import os
import signal
import time

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
    "failed" at the step reached (not the step the attempt started at). (Resuming after it: the
    retry test below.)"""
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


def test_each_logged_step_says_what_was_measured(tmp_path, bpe_tokenizer, bpe_corpus):
    """Throughput, time waiting for data, checkpoint time, peak memory, restarts, and achieved
    FLOP/s by torchtitan's count 6(N - N_emb) + 12 L H T, recomputed here from the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    run = tmp_path / "run"
    spec = clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=6, training__log_every=2,
                    checkpoint__every_steps=3)
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [2, 4, 6]
    for x in steps:
        assert x["step_time_s"] > 0 and 0 <= x["data_wait_s"] < x["step_time_s"]
        assert abs(x["samples_per_s"] * 32 - x["tokens_per_s"]) < 1e-6 * x["tokens_per_s"]  # seq_len 32
        assert x["peak_mem_mib"] > 0 and x["restarts"] == 0 and "mfu" not in x  # CPU: FLOP/s, no ratio
    cfg = dict(spec["model"]["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    n = sum(p.numel() for p in model.parameters())
    per_token = 6 * (n - model.get_input_embeddings().weight.numel()) + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 32
    x = steps[-1]
    assert abs(x["tflops_per_device"] - per_token * x["tokens_per_s"] / 2 / 1e12) < 1e-9
    assert [x["step"] for x in recs if "ckpt_save_s" in x] == [3, 6]


def test_a_rank_killed_once_is_retried_and_the_run_finishes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    """cluster.retries_on_failure: 2 and one rank killed (a lost node, an OOM kill): the launcher
    restarts from the newest checkpoint by itself and every loss equals the uninterrupted run's."""
    from tests.trainers.helpers import losses

    def spec(run):
        return clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=30, training__log_every=1,
                        checkpoint__every_steps=5, cluster__retries_on_failure=2)

    ref = tmp_path / "ref"
    assert run_cli("run", str(write_spec(tmp_path / "ref.yaml", spec(ref)))).returncode == 0
    run = tmp_path / "run"
    proc = start_run(write_spec(tmp_path / "s.yaml", spec(run)))
    wait_for(lambda: last_step(run) >= 12, timeout=120, what="step 12")
    os.kill(next(p for p in trainer_pids(run) if rank_of(p) == 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "rank 1 killed by SIGKILL" in out and "retry 1 of 2" in out and "resuming from" in out
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "finished" and [r["reason"] for r in st["retries"]] == ["rank 1 killed by SIGKILL"]
    assert losses(run) == losses(ref)
    status = run_cli("status", str(run)).stdout
    assert "retries: 1 (step" in status and "1 restart(s)" in status
    # the two runs on one figure, the restart marked
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (extra 'plot')")
    from matplotlib.image import imread

    r = run_cli("plot", str(run), str(ref), "--out", str(tmp_path / "cmp.png"))
    assert r.returncode == 0 and "plot written to" in r.stdout, r.stderr
    img = imread(tmp_path / "cmp.png")
    assert img.shape[0] > 500 and img.shape[1] > 1000 and img[..., :3].std() > 0.05  # drawn, not blank
    blue = (img[..., 2] > 0.6) & (img[..., 0] < 0.3)  # C0: the retried run and its restart line
    orange = (img[..., 0] > 0.9) & (img[..., 1] > 0.4) & (img[..., 1] < 0.6) & (img[..., 2] < 0.2)  # C1: ref
    assert blue.sum() > 500 and orange.sum() > 500
    r = run_cli("plot", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


def test_the_same_step_failing_twice_stops_retrying(tmp_path, bpe_tokenizer, bpe_corpus):
    """A deterministic crash after step 7 (a test switch): retried once from step 5, fails at 7
    again, and the launcher stops instead of burning the allocation, saying why."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=30,
                                                     training__log_every=1, checkpoint__every_steps=5,
                                                     cluster__retries_on_failure=3))
    r = run_cli("run", str(spec), env={"HPCTRAIN_FAULT_FAIL_AT_STEP": "7"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("retry ") == 1 and "step 7 failed twice in a row: not retrying" in r.stderr
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and st["step"] == 7 and len(st["retries"]) == 1
    assert st["reason"].startswith("rank 0 exited with code 1") and "failed again at step 7" in st["reason"]
    assert "trainer: failed at step 7/30" in run_cli("status", str(run)).stdout
    assert trainer_pids(run) == []


def test_a_stalled_rank_is_reported_as_hung_with_every_ranks_stacks(tmp_path, bpe_tokenizer, bpe_corpus):
    """Rank 1 stops making progress at step 6 (a test switch); rank 0 waits in the stop
    agreement's all-reduce. After monitor.hang_timeout_s both ranks dump their stacks into their
    logs, status says "hung" naming rank 1 as the one that did not arrive, the run exits 1 (no
    retry), and no process is left."""
    run = tmp_path / "run"
    spec = clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=30, training__log_every=1,
                    checkpoint__every_steps=5, cluster__retries_on_failure=2)
    spec["monitor"] = {"hang_timeout_s": 6}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), env={"HPCTRAIN_FAULT_STALL": "1:6"})
    assert r.returncode == 1, r.stdout + r.stderr
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "hung" and st["step"] == 6, st
    assert "ranks that did not arrive: [1]" in st["reason"] and "in after_step" in st["reason"], st["reason"]
    assert "waiting in a collective: [0]" in st["reason"]
    assert "training hung:" in r.stderr and "retry" not in r.stdout
    logs = {int(p.parent.name): p.read_text() for p in (run / "logs").rglob("stderr.log")}
    assert all("hung; stacks of every thread follow" in t and "Thread 0x" in t for t in logs.values()), logs
    assert "all_reduce" in logs[0] or "agree" in logs[0]  # rank 0's stack: inside the collective
    assert "trainer: hung at step 6/30" in run_cli("status", str(run)).stdout
    assert trainer_pids(run) == []


def test_ctrl_c_twice_is_recorded_as_cancelled(tmp_path, bpe_tokenizer, bpe_corpus):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", clm_spec(run, bpe_tokenizer, bpe_corpus, training__steps=200,
                                                     training__log_every=1))
    proc = start_run(spec)
    wait_for(lambda: last_step(run) >= 5, timeout=120, what="step 5")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "aborting" in out, out
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "cancelled" and st["step"] >= 5 and "Ctrl-C twice" in st["reason"]
    assert "trainer: cancelled at step" in run_cli("status", str(run)).stdout
    wait_for(lambda: trainer_pids(run) == [], timeout=30, what="all ranks gone")
