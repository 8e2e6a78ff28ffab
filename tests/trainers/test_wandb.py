"""W&B (offline mode, read back from its own run files): one run per run dir across a crash
and a resume, history equal to metrics.jsonl, no secret in any file, failures never stop training."""

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

pytest.importorskip("wandb", reason="wandb is not installed (extra 'wandb')")
pytestmark = pytest.mark.multiproc
SECRET = "hpctrain-test-secret-0123456789abcdef0123"  # noqa: S105 - a fake key that must leak nowhere


def _spec(run, tok, corpus, mode: str) -> dict:
    s = clm_spec(run, tok, corpus, training__steps=30, training__log_every=1, checkpoint__every_steps=5)
    s["monitor"] = {"wandb": {"mode": mode, "project": "hpctrain-tests", "tags": ["ci"]}}
    return s


def test_one_wandb_run_across_a_crash_and_resume_with_metrics_jsonls_history(tmp_path, bpe_tokenizer, bpe_corpus):
    from hpctrain.launcher.wandb_files import merged_history, offline_segments, read_run

    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, "offline"))
    env = {"WANDB_API_KEY": SECRET}
    proc = start_run(spec, env=env)
    wait_for(lambda: last_step(run) >= 13, timeout=120, what="step 13")
    os.kill(next(p for p in trainer_pids(run) if rank_of(p) == 1), signal.SIGKILL)  # a crash
    proc.communicate(timeout=120)
    assert proc.returncode == 1
    crashed_at = last_step(run)
    r = run_cli("run", str(spec), env=env)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    run_id = (run / "wandb_id").read_text().strip()
    assert f"W&B run {run_id} (offline)" in r.stdout
    assert f"W&B run: {run_id} (2 offline segment(s)" in run_cli("status", str(run)).stdout
    segments = offline_segments(run)
    assert len(segments) == 2  # released wandb: a new offline folder per attempt, one id
    runs = [read_run(s) for s in segments]
    assert {x["id"] for x in runs} == {run_id} and {x["project"] for x in runs} == {"hpctrain-tests"}
    # the config is the frozen spec
    assert runs[1]["config"]["training"]["steps"] == 30 and runs[1]["config"]["name"] == "tiny-clm"
    # steps between the last checkpoint (10) and the crash were trained again by the second segment
    assert max(runs[0]["history"]) >= crashed_at - 1 > 10 and min(runs[1]["history"]) == 11
    # merged (the newer segment wins each step): metrics.jsonl's last value per step, no gap, no duplicate
    expected: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "mem_base_mib" in rec:
            continue
        expected.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k not in ("step", "time")})
    merged = merged_history(run)
    assert sorted(merged) == list(range(1, 31)) == sorted(expected)
    for step, row in expected.items():
        assert {k: merged[step][k] for k in row} == row, step
    # `hpctrain sync --offline`: the merged run as one offline run, built twice: still one, no duplicate
    for _ in range(2):
        r = run_cli("sync", str(run), "--offline")
        assert r.returncode == 0 and "2 offline segment(s)" in r.stdout and "wandb sync" in r.stdout, r.stderr
    (one,) = list((run / "wandb-merged").glob("offline-run-*/run-*.wandb"))
    built = read_run(one)
    assert built["id"] == run_id and built["rows"] == 30 and built["history"] == merged
    assert offline_segments(run) == segments  # the merged run is not taken for a segment
    # the upload path needs a W&B server (none here): without a key it fails clearly, records nothing
    r = run_cli("sync", str(run), env={"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "x")})
    assert r.returncode == 1 and "W&B sync failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (run / "wandb_synced.json").exists()
    # the key in the environment reached no file of the run dir (W&B's folder included)
    leaks = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_wandb_failing_never_stops_training(tmp_path, bpe_tokenizer, bpe_corpus):
    """Online with no API key: one warning, the run trains to the end, metrics.jsonl complete."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", _spec(run, bpe_tokenizer, bpe_corpus, "online"))
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    v = run_cli("validate", str(spec), env=env)
    assert v.returncode == 0 and "no W&B key is set" in v.stdout
    r = run_cli("run", str(spec), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("warning: W&B failed") == 1 and "Traceback" not in r.stdout + r.stderr
    steps = {json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x}
    assert steps == set(range(1, 31))


def test_wandb_not_installed_is_a_clear_error(tmp_path, bpe_tokenizer, bpe_corpus):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["wandb"] = None  # as if not installed\n')
    spec = write_spec(tmp_path / "s.yaml", _spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, "offline"))
    r = run_cli("validate", str(spec), env={"PYTHONPATH": str(hide)})
    assert r.returncode == 2 and "monitor.wandb.mode" in r.stderr and "W&B is not installed" in r.stderr


def test_pipeline_stages_share_a_wandb_group(tmp_path):
    from hpctrain.launcher.pipeline import load_pipeline

    data = {"name": "domain", "run_dir": str(tmp_path / "runs"),
            "defaults": {"monitor": {"wandb": {"mode": "offline"}}},
            "stages": [
                {"name": "a", "model": {"config": {"model_type": "llama"}, "tokenizer": str(tmp_path)},
                 "data": {"corpora": [{"path": str(tmp_path)}], "seq_len": 8},
                 "training": {"global_batch": 2, "micro_batch": 2, "steps": 1, "lr": 1e-3}},
                {"name": "b", "model": {"config": {"model_type": "llama"}, "tokenizer": str(tmp_path)},
                 "data": {"corpora": [{"path": str(tmp_path)}], "seq_len": 8},
                 "training": {"global_batch": 2, "micro_batch": 2, "steps": 1, "lr": 1e-3},
                 "monitor": {"wandb": {"mode": "offline", "group": "mine"}}},
            ]}
    stages = dict(load_pipeline(data, "p.yaml", []))
    assert stages["a"].monitor.wandb.group == "domain" and stages["b"].monitor.wandb.group == "mine"
