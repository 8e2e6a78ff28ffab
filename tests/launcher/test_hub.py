"""Hub model ids (`model.path: org/name[@revision]`) pinned where the run is launched, against a
stand-in Hub on 127.0.0.1: the commit sha is recorded in the frozen spec, the ranks load that
snapshot from the cache, a later launch of the run dir keeps the sha after the branch moved (and
asks the Hub nothing), and an id, a revision or a Hub that is not there is one line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.hub_server import StandInHub
from tests.trainers.helpers import DATA, losses, write_spec

REPO_ID = "acme/tiny-bert"


@pytest.fixture
def hub(tiny_bert):
    with StandInHub() as h:
        repo = h.repo(REPO_ID)
        repo.commit(Path(tiny_bert), "v1")
        repo.commit(Path(tiny_bert), "main", change=b"second commit")
        yield h


def spec(tmp_path, model: str, run: str = "run") -> dict:
    return {
        "name": "hub", "run_dir": str(tmp_path / run), "task": "finetune",
        "model": {"path": model, "hub_cache": str(tmp_path / "cache")},
        "finetune": {"kind": "classify", "method": "full", "train_file": str(DATA / "classify_train.csv"),
                     "valid_file": str(DATA / "classify_valid.csv"), "seq_len": 32},
        "training": {"global_batch": 8, "micro_batch": 8, "steps": 2, "lr": 1e-3, "eval_every": 2, "seed": 3},
        "checkpoint": {"every_steps": 2},
        "cluster": {"procs_per_node": 1},
    }


def online(hub) -> dict:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}


def model_requests(hub) -> list[tuple[str, str]]:
    return [r for r in hub.requests if REPO_ID in r[1]]


def test_a_hub_id_is_pinned_at_launch_and_a_later_launch_keeps_the_commit(tmp_path, hub):
    main, v1 = hub.repo(REPO_ID).refs["main"], hub.repo(REPO_ID).refs["v1"]
    path = write_spec(tmp_path / "s.yaml", spec(tmp_path, REPO_ID))
    r = run_cli("run", str(path), env=online(hub))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model.path: {REPO_ID}@main is commit {main}" in r.stderr
    frozen = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    snapshot = tmp_path / "cache" / "models--acme--tiny-bert" / "snapshots" / main
    assert frozen["model"]["path"] == str(snapshot) and (snapshot / "config.json").is_file()
    assert frozen["hub"] == {"model.path": {"id": REPO_ID, "revision": "main", "sha": main}}
    assert sorted(losses(tmp_path / "run")) == [1, 2]

    # main moves on; the same run dir launched again (two more steps) keeps its commit and
    # asks the Hub nothing
    hub.repo(REPO_ID).commit(tmp_path / "cache" / "models--acme--tiny-bert" / "snapshots" / main, "main",
                             change=b"third commit")
    asked = len(model_requests(hub))
    r = run_cli("run", str(path), "--set", "training.steps=4", env=online(hub))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    assert f"stays at commit {main}" in r.stderr
    assert model_requests(hub)[asked:] == []
    assert yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())["hub"]["model.path"]["sha"] == main
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert f"model.path: {REPO_ID}@main pinned to commit {main}" in run_cli("status", str(tmp_path / "run")).stdout

    # a revision named in the spec: a tag, pinned to its own commit (validate pins as run does)
    other = write_spec(tmp_path / "v1.yaml", spec(tmp_path, f"{REPO_ID}@v1", run="tagged"))
    r = run_cli("validate", str(other), env=online(hub))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model.path: {REPO_ID}@v1 is commit {v1}" in r.stderr


def test_a_missing_id_revision_or_hub_is_one_line_before_anything_is_written(tmp_path, hub, tiny_bert):
    gated = hub.repo("acme/gated")
    gated.commit(Path(tiny_bert), "main")
    gated.gated = True
    cases = [("acme/no-such-model", "no model acme/no-such-model on the Hub"),
             (f"{REPO_ID}@v9", f"{REPO_ID} has no revision 'v9'"),
             ("acme/gated", "acme/gated is gated")]
    for model, says in cases:
        path = write_spec(tmp_path / "s.yaml", spec(tmp_path, model))
        r = run_cli("run", str(path), env=online(hub))
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"{path}: model.path: {says}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()
    r = run_cli("validate", str(path), env={**online(hub), "HF_TOKEN": "hf_any"})  # with a token it pins
    assert r.returncode == 0 and f"model.path: acme/gated@main is commit {gated.refs['main']}" in r.stderr, r.stderr
    assert "hf_any" not in r.stdout + r.stderr

    # two stages of a pipeline that name the same id: asked and pinned once, for both
    stage = {k: v for k, v in spec(tmp_path, REPO_ID).items() if k not in ("name", "run_dir")}
    pipeline = {"name": "two", "run_dir": str(tmp_path / "two"), "stages": [{"name": "a", **stage}, {"name": "b", **stage}]}
    asked = len([q for q in model_requests(hub) if "/revision/" in q[1]])
    r = run_cli("validate", str(write_spec(tmp_path / "p.yaml", pipeline)), env=online(hub))
    assert r.returncode == 0 and r.stderr.count(f"model.path: {REPO_ID}@main is commit") == 1, r.stdout + r.stderr
    assert len([q for q in model_requests(hub) if "/revision/" in q[1]]) == asked + 1

    main = hub.repo(REPO_ID).refs["main"]
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec(tmp_path, REPO_ID))), env=online(hub))
    assert r.returncode == 0, r.stderr  # main is in the cache now, by its sha
    hub.stop()
    for model in (REPO_ID, f"{REPO_ID}@v1"):  # a branch or tag needs the Hub to say where it points
        path = write_spec(tmp_path / "s.yaml", spec(tmp_path, model))
        r = run_cli("submit", str(path), "--dry-run", env=online(hub))
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"model.path: cannot reach the Hub at {hub.endpoint} to pin {model.split('@')[0]}@" in r.stderr
        assert f"(and no folder {model.split('@')[0]} exists here)" in r.stderr  # not a mistyped local path
        assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    r = run_cli("submit", str(write_spec(tmp_path / "s.yaml", spec(tmp_path, f"{REPO_ID}@{main}"))), "--dry-run",
                env=online(hub))
    assert r.returncode == 0, r.stderr  # a full sha already in the cache needs no Hub
    assert f"model.path: {REPO_ID}@{main} is commit {main}" in r.stderr and "#SBATCH" in r.stdout
