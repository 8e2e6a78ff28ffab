"""Fine-tuning under DeepSpeed ZeRO on CPU (gloo, 2 real torchrun ranks): full, LoRA, QLoRA."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.trainers.helpers import DATA, cls_spec, losses, sft_spec, stop_with_ctrl_c, write_spec

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (extra 'deepspeed')")
pytestmark = [pytest.mark.multiproc, pytest.mark.deepspeed]
STEPS = 20
BNB_CPU_PATH = Path(__file__).parent / "bnb_cpu_path"


def _val(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]


@pytest.fixture(scope="module")
def odd_valid(tmp_path_factory):
    """49 validation examples: 25 on rank 0, 24 on rank 1, so the ranks run different numbers of
    evaluation batches (7 and 6 at micro-batch 4) - under ZeRO-3 every forward is collective."""
    rows = list(csv.DictReader(open(DATA / "classify_valid.csv")))[:49]
    path = tmp_path_factory.mktemp("valid") / "valid49.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path, rows


def _lora_z3_spec(d, base, valid) -> dict:
    # partition every parameter, however small (DeepSpeed keeps tensors under 1e5 elements whole
    # by default, which would hide a missing gather of the tiny LoRA matrices)
    user = d / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    s = cls_spec(d / "run", base, valid_file=str(valid), merge=False)
    s["training"].update(steps=STEPS, eval_every=10, micro_batch=4, log_every=1)
    s["checkpoint"] = {"every_steps": 5}
    s["engine"] = {"type": "deepspeed", "zero_stage": 3, "config": str(user)}
    return s


@pytest.fixture(scope="module")
def lora_z3(tmp_path_factory, tiny_bert, odd_valid):
    """LoRA classification of the 2-layer BERT of width 32 under ZeRO-3: what is partitioned,
    gathered and saved does not depend on the model's size."""
    d = tmp_path_factory.mktemp("lora-z3")
    spec = write_spec(d / "s.yaml", _lora_z3_spec(d, tiny_bert, odd_valid[0]))
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "run", r


def test_lora_adapter_saved_under_zero3_is_whole_and_reproduces_the_validation_metric(lora_z3, tiny_bert,
                                                                                         odd_valid):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _ = lora_z3
    saved = load_file(run / "export" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and all(v.numel() > 0 for v in saved.values())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = PeftModel.from_pretrained(base, run / "export").eval()
    trained = {n for n, p in model.named_parameters() if "lora_" in n}
    assert len(trained) == sum("lora_" in k for k in saved)  # every adapter tensor, with its shape
    tok = AutoTokenizer.from_pretrained(run / "export")
    labels = json.loads((run / "export" / "labels.json").read_text())["labels"]
    rows = odd_valid[1]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    with torch.no_grad():
        logits = model(**enc).logits
    final = _val(run)[-1]
    assert abs(float((logits.argmax(-1) == y).float().mean()) - final["accuracy"]) < 1e-6
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert abs(loss - final["val_loss"]) < 1e-4, (loss, final["val_loss"])
    assert final["accuracy"] > _val(run)[0]["accuracy"] - 0.2  # it trained, it did not diverge
    # checkpoints hold the adapter and its optimizer state, not the frozen base
    ds_dir = run / "checkpoints" / f"step_{STEPS:08d}" / "ds"
    ckpt_bytes = sum(f.stat().st_size for f in ds_dir.iterdir())
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert ckpt_bytes < base_bytes / 10, (ckpt_bytes, base_bytes)


def test_lora_under_zero3_resumes_bitwise(tmp_path, lora_z3, tiny_bert, odd_valid):
    ref = losses(lora_z3[0])
    spec = write_spec(tmp_path / "s.yaml", _lora_z3_spec(tmp_path, tiny_bert, odd_valid[0]))
    run = tmp_path / "run"
    stopped = stop_with_ctrl_c(spec, run, 6, timeout=600)
    assert 6 <= stopped < STEPS
    r = run_cli("run", str(spec), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    got = losses(run)
    assert [got[s] for s in range(stopped + 1, STEPS + 1)] == [ref[s] for s in range(stopped + 1, STEPS + 1)]


def test_full_finetune_under_zero2_matches_ddp(tmp_path, tiny_bert):
    runs = {}
    for name, engine in (("ddp", {}), ("zero2", {"type": "deepspeed", "zero_stage": 2})):
        s = cls_spec(tmp_path / name, tiny_bert, method="full", merge=False)
        s["training"].update(steps=8, eval_every=8, log_every=1, lr=5e-5)
        s["engine"] = engine
        r = run_cli("run", str(write_spec(tmp_path / f"{name}.yaml", s)), timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = losses(tmp_path / name)
    assert sorted(runs["zero2"]) == list(range(1, 9))
    for s, ref in runs["ddp"].items():  # the bound of test_deepspeed.py (only reduction order differs)
        assert abs(runs["zero2"][s] - ref) <= 1e-4 * abs(ref), (s, runs["zero2"][s], ref)
    assert (tmp_path / "zero2" / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("avx512_bf16", ["1", "0"], ids=["avx512bf16-path", "plain-path"])
def test_qlora_sft_trains_under_zero3(tmp_path, tiny_llama, avx512_bf16):
    """On either of bitsandbytes' CPU paths (forced in every process: tests/trainers/bnb_cpu_path)."""
    spec = sft_spec(tmp_path / "run", tiny_llama, "qlora", steps=12)
    spec["cluster"]["procs_per_node"] = 2
    spec["engine"] = {"type": "deepspeed", "zero_stage": 3}
    env = {"HPCTRAIN_TEST_BNB_AVX512BF16": avx512_bf16,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BNB_CPU_PATH), os.environ.get("PYTHONPATH")]))}
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    ls = losses(tmp_path / "run")
    assert sum(ls[s] for s in (10, 11, 12)) < sum(ls[s] for s in (1, 2, 3)) - 0.3
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(tmp_path / "run" / "export" / "adapter_model.safetensors")
    assert saved and all(v.numel() > 0 for v in saved.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "run" / "export")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
