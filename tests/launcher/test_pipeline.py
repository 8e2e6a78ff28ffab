"""Pipelines: stages run in order locally; a later stage starts from the earlier one's export."""

from __future__ import annotations

import json

import pytest
import yaml

from hpctrain.launcher.contract.errors import UserErrors
from hpctrain.launcher.pipeline import load_pipeline
from tests.conftest import run_cli
from tests.trainers.helpers import TINY_LLAMA, losses


def pipeline(root, tok, corpus) -> dict:
    base = {
        "objective": {"type": "clm"},
        "data": {"corpora": [{"path": corpus}], "seq_len": 32},
        "training": {"global_batch": 8, "micro_batch": 4, "steps": 10, "lr": 2e-3, "seed": 1},
        "cluster": {"procs_per_node": 1},
    }
    return {
        "name": "pipe",
        "run_dir": str(root),
        "defaults": base,
        "stages": [
            {"name": "pretrain", "model": {"config": TINY_LLAMA, "tokenizer": tok}},
            {"name": "more", "model": {"path": "stage:pretrain"}, "training": {"steps": 4, "lr": 1e-4}},
        ],
    }


def test_stage_references_and_overrides(tmp_path, bpe_tokenizer, bpe_corpus):
    stages = load_pipeline(pipeline(tmp_path / "p", bpe_tokenizer, bpe_corpus), "p.yaml", ["more.training.steps=6"])
    (n1, s1), (n2, s2) = stages
    assert (n1, n2) == ("pretrain", "more")
    assert s2.model.path == str(tmp_path / "p" / "pretrain" / "export")
    assert s2.training.steps == 6 and s2.training.lr == 1e-4 and s2.training.global_batch == 8
    assert s1.run_path == str(tmp_path / "p" / "pretrain")
    bad = pipeline(tmp_path / "p", bpe_tokenizer, bpe_corpus)
    bad["stages"][0]["model"] = {"path": "stage:more"}
    with pytest.raises(UserErrors, match="stages.0.model.path: 'stage:more' names no earlier stage"):
        load_pipeline(bad, "p.yaml", [])


def test_local_pipeline_runs_stages_in_order_from_the_export(tmp_path, bpe_tokenizer, bpe_corpus):
    """...and, with W&B offline, each stage is its own W&B run in the pipeline's group (read
    back from the W&B files)."""
    root = tmp_path / "p"
    spec = tmp_path / "pipe.yaml"
    data = pipeline(root, bpe_tokenizer, bpe_corpus)
    data["defaults"]["monitor"] = {"wandb": {"mode": "offline"}}
    spec.write_text(yaml.safe_dump(data))
    assert run_cli("validate", str(spec)).returncode == 0
    r = run_cli("run", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.index("== stage pretrain") < r.stdout.index("== stage more")
    first, second = losses(root / "pretrain"), losses(root / "more")
    # the second stage starts from the trained export, not from scratch
    assert second[1] < first[1] - 0.2
    frozen = yaml.safe_load((root / "more" / "spec.yaml").read_text())
    assert frozen["model"]["path"] == str(root / "pretrain" / "export")
    for stage in ("pretrain", "more"):
        assert json.loads((root / stage / "status.json").read_text())["state"] == "finished"
    from hpctrain.launcher.wandb_files import offline_segments, read_run

    runs = [read_run(seg) for stage in ("pretrain", "more") for seg in offline_segments(root / stage)]
    assert [w["group"] for w in runs] == ["pipe", "pipe"] and runs[0]["id"] != runs[1]["id"]
    assert [max(w["history"]) for w in runs] == [10, 4]
    r = run_cli("run", str(spec))  # again: both stages are done
    assert r.returncode == 0 and r.stdout.count("already finished") == 2
