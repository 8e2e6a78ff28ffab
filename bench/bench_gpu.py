"""One GPU: a ~1.1B Llama, seq 2048, bf16, through `hpctrain run` and through HF Trainer.

    .venv/bin/python bench/bench_gpu.py                 # on a CUDA machine (about 10 minutes)
    .venv/bin/python bench/bench_gpu.py --tiny          # the same path on a CPU, tiny model (a check)
    .venv/bin/python bench/bench_gpu.py --levers baseline master liger compile docmask all

Each lever (LEVERS below) is one hpctrain run with one change over the baseline, measured in
the same call as HF Trainer on the same model and samples.

Same model config (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads,
4 KV heads, vocabulary 32,000, from scratch, seed 0), same packed samples (the
shipped domain text x 10, tokenized with MiniLM's tokenizer: bench_trainer's corpus), micro-batch 4,
global batch 8, 40 steps, AdamW (fused), bf16 autocast over fp32 weights, a
checkpoint at step 30. Printed for each: tokens/s (median of the steps after the
first 5), peak GPU memory (torch.cuda.max_memory_allocated), MFU = achieved
FLOP/s / peak, with FLOPs per token = 6·(N − N_embedding) + 12·L·H·T
(torchtitan's count) and the peak from hpctrain's table (H100 989 TFLOP/s bf16
dense; `--peak-tflops` overrides), and how long the step-30 checkpoint blocked
training (hpctrain: `ckpt_save_s`, written in the background; HF Trainer: the
step's time minus the median step, its save being synchronous).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_trainer import build_corpus, tokenizer_path  # the shared corpus and tokenizer

REPO = Path(__file__).resolve().parents[1]
BIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
       "max_position_embeddings": 2048, "tie_word_embeddings": False}
TINY = {**BIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
STEPS, MICRO, GLOBAL, SAVE_AT = 40, 4, 8, 30


def flops_per_token(cfg: dict, seq: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = dict(cfg)
    with __import__("torch").device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    n = sum(p.numel() for p in m.parameters())
    return 6 * (n - m.get_input_embeddings().weight.numel()) + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq


# Each lever on its own over the baseline (DDP's path at one GPU: bf16 autocast over fp32
# weights, PyTorch's kernels): what it changes in the run spec
LEVERS = {
    "baseline": {"training": {"kernels": "torch"}},
    "master": {"engine": {"type": "fsdp"}, "training": {"kernels": "torch"}},  # bf16 weights, fp32 master
    "liger": {"training": {"kernels": "liger"}},
    "compile": {"training": {"kernels": "torch", "compile": True}},
    "docmask": {"training": {"kernels": "torch"}, "data": {"document_mask": True}},
    "all": {"engine": {"type": "fsdp"}, "training": {"kernels": "liger"}, "data": {"document_mask": True}},
}


def ours(root: Path, cfg: dict, seq: int, peak: float | None, lever: str = "baseline") -> dict:
    run = root / f"hpctrain-{lever}-{time.time_ns()}"
    spec = {"name": "bench-gpu", "run_dir": str(run), "model": {"config": cfg, "tokenizer": tokenizer_path()},
            "objective": {"type": "clm"}, "data": {"corpora": [{"path": str(build_corpus(root))}], "seq_len": seq},
            "training": {"global_batch": GLOBAL, "micro_batch": MICRO, "steps": STEPS, "lr": 3e-4,
                         "warmup_steps": 5, "precision": "bf16", "log_every": 1, "seed": 0},
            "checkpoint": {"every_steps": SAVE_AT, "keep_last": 1}, "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    for section, values in LEVERS[lever].items():
        spec.setdefault(section, {}).update(values)
    if peak:
        spec["monitor"] = {"peak_tflops": peak}
    path = root / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "hpctrain.launcher.cli", "run", str(path)], check=True, cwd=REPO)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r][5:]
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
           "peak_mem_gib": max(r["peak_mem_mib"] for r in steps) / 1024,
           "ckpt_blocked_s": next(r["ckpt_save_s"] for r in recs if r.get("step") == SAVE_AT and "ckpt_save_s" in r),
           "ckpt_write_s": next((r["ckpt_write_s"] for r in recs if "ckpt_write_s" in r), None)}
    mfu = [r["mfu"] for r in steps if "mfu" in r]
    if mfu:
        out["mfu_hpctrain_reported"] = statistics.median(mfu)
    return out


def hf(root: Path, cfg: dict, seq: int) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hpctrain.launcher.contract.corpus import open_corpus
    from hpctrain.trainers.data.sampler import PackedSource, SampleOrder

    src = PackedSource(open_corpus(build_corpus(root)).split(), seq)
    _, idx = SampleOrder([src.num_samples], seed=0).take(STEPS * GLOBAL)
    data = [torch.from_numpy(src.sample(i).astype(np.int64)) for i in idx]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i][:-1], "labels": data[i][:-1]}

    c = dict(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=GLOBAL // MICRO, max_steps=STEPS, learning_rate=3e-4,
                             warmup_steps=5, bf16=True, optim="adamw_torch_fused", save_strategy="steps",
                             save_steps=SAVE_AT, save_only_model=False, logging_strategy="no", report_to=[],
                             seed=0, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=DS(), callbacks=[Clock()]).train()
    dts = np.diff(marks)  # dts[k] ends at step k + 2
    typical = float(np.median(dts[4:]))
    # HF saves after on_step_end of the save step: the next step's interval holds the save
    blocked = max(0.0, float(dts[SAVE_AT - 1] - typical)) if len(dts) > SAVE_AT - 1 else None
    return {"tokens_per_s": GLOBAL * seq / typical,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "ckpt_blocked_s": blocked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and seq 64: check the path on a CPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: hpctrain's table)")
    ap.add_argument("--only", choices=["hpctrain", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--lever", choices=list(LEVERS), default="baseline", help=argparse.SUPPRESS)
    ap.add_argument("--levers", nargs="*", choices=list(LEVERS), default=["baseline"],
                    help="hpctrain configurations to run, each in its own process (default: baseline); "
                    f"all of them: {' '.join(LEVERS)}")
    ap.add_argument("--out", default="/tmp/hpctrain-bench-gpu")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cfg, seq = (TINY, 64) if args.tiny else (BIG, 2048)
    if args.only:
        res = ours(root, cfg, seq, args.peak_tflops, args.lever) if args.only == "hpctrain" else hf(root, cfg, seq)
        print(json.dumps(res))
        return
    import torch

    from hpctrain.trainers.monitor import device_peak_tflops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or device_peak_tflops(device, "bf16", None)
    per_token = flops_per_token(cfg, seq)
    print(f"device: {name}; FLOPs/token {per_token:.4g} (6(N - N_emb) + 12 L H T); peak "
          f"{peak or 'unknown'} TFLOP/s bf16", flush=True)
    results = {}
    runs = [(f"hpctrain:{lever}", ["--only", "hpctrain", "--lever", lever]) for lever in args.levers]
    for who, which in runs + [("hf", ["--only", "hf"])]:  # each in its own process: clean peak memory
        cmd = [sys.executable, __file__, *which, "--out", str(root)] + (["--tiny"] if args.tiny else [])
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = root / f"{who.replace(':', '-')}.log"
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            sys.exit(f"{who} failed (exit {proc.returncode}); its output, in {log}, ends:\n"
                     + (proc.stdout + proc.stderr)[-4000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["tflops"] = per_token * res["tokens_per_s"] / 1e12
        if peak:
            res["mfu"] = res["tflops"] / peak
        results[who] = res
        print(who, json.dumps(res), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
