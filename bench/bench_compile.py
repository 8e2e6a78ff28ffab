"""`training.compile` and bf16 autocast on this machine, through `hpctrain run`.

    .venv/bin/python bench/bench_compile.py [--steps 30]

Continued MLM pretraining of the pretrained MiniLM-L6 on bench_trainer's corpus (the shipped domain text x 10)
(seq 128, micro = global batch 16, one process with this machine's threads), in
four variants: fp32 or bf16 autocast, eager or torch.compile. Prints, for each,
the median step time over the steps after the first 10 (compilation and warm-up
excluded), the start-up until step 1 (compilation included), and the last loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_trainer import build_corpus, run_spec, tokenizer_path  # the shared corpus and model

REPO = Path(__file__).resolve().parents[1]


def one(root: Path, precision: str, compile_: bool, steps: int) -> dict:
    model = tokenizer_path()  # the pretrained MiniLM (model and tokenizer)
    run = root / f"{precision}-{'compiled' if compile_ else 'eager'}-{time.time_ns()}"
    spec = {"name": "bench-compile", "run_dir": str(run), "model": {"path": model},
            "objective": {"type": "mlm"},
            "data": {"corpora": [{"path": str(build_corpus(root))}], "seq_len": 128},
            "training": {"global_batch": 16, "micro_batch": 16, "steps": steps, "lr": 1e-4, "seed": 0,
                         "precision": precision, "compile": compile_, "log_every": 1},
            "checkpoint": {"every_steps": 100_000}, "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    t0 = time.time()
    recs = [r for r in run_spec(spec, root) if "loss" in r]
    return {"precision": precision, "compile": compile_,
            "step_s": round(statistics.median(r["step_time_s"] for r in recs[10:]), 3),
            "until_step_1_s": round(recs[0]["time"] - t0, 1), "last_loss": round(recs[-1]["loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-compile")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision, compile_ in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        rows.append(one(root, precision, compile_, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["step_s"]
    for r in rows:
        print(f"{r['precision']:5s} {'compiled' if r['compile'] else 'eager':9s} step {r['step_s']:.3f} s "
              f"({base / r['step_s']:.2f}x eager fp32), start {r['until_step_1_s']} s, loss {r['last_loss']}")


if __name__ == "__main__":
    main()
