"""Seq2seq re-training throughput and quality: `hpctrain run` (kind seq2seq) vs HF
`Seq2SeqTrainer` with `predict_with_generate`, same model, data, batch, lengths and steps.

    .venv/bin/python bench/bench_seq2seq.py [--steps 300] [--rounds 1] [--seeds 0,1,2]

Data: English -> German pairs from the project's phrase grammar
(examples/data/make_translation_data.py), 1-4 sentences per example joined into one (so lengths
vary as a real parallel corpus's do: 10-80 tokens a side), 4,000 training and 200 validation
pairs, seeded; a byte-level BPE tokenizer (2,000) trained on them. Model: a Marian-shaped
encoder-decoder built from its config (d_model 256, 3 + 3 layers, 4 heads, FFN 1024, 4.6M
parameters with the tied embeddings), its initial weights saved once and loaded by both sides.
Training: full, batch 16, source_len = target_len = 128, lr 5e-4, 20 warmup steps, cosine,
AdamW betas (0.9, 0.999), no weight decay, grad clip 1.0, fp32, one process with this machine's
threads. HF: DataCollatorForSeq2Seq (each batch padded to its longest source and target),
random order. hpctrain: length-grouped batches (its default). Both generate the validation
sources greedily (max 160 new tokens) after the last step and score sacrebleu's corpus BLEU.
Prints wall time of training (first step to last, start-up excluded), real (non-pad) source +
target tokens per second, and BLEU. Rounds interleave (A B, B A). `--seeds` trains each side once
per seed (the data order's; the initial weights stay the same) and prints the mean BLEU of each:
one run's BLEU after 1,000 steps moves by about 1 point with the order alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench_trainer import run_spec  # `hpctrain run` of a spec, its metrics records

REPO = Path(__file__).resolve().parents[1]
BATCH, LEN, LR, WARMUP, NEW = 16, 128, 5e-4, 20, 160
CONFIG = {"model_type": "marian", "d_model": 256, "encoder_layers": 3, "decoder_layers": 3,
          "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 1024,
          "decoder_ffn_dim": 1024, "max_position_embeddings": 256, "pad_token_id": 1, "eos_token_id": 0,
          "decoder_start_token_id": 1, "forced_eos_token_id": 0, "dropout": 0.0}


def grammar():
    spec = importlib.util.spec_from_file_location("make_translation_data",
                                                  REPO / "examples" / "data" / "make_translation_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(root: Path) -> tuple[Path, Path, Path]:
    """(train.jsonl, valid.jsonl, the initial model folder with its tokenizer)."""
    train, valid, init = root / "train.jsonl", root / "valid.jsonl", root / "init"
    if train.exists() and valid.exists() and (init / "config.json").exists():
        return train, valid, init
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from hpctrain.tools.train_tokenizer import train_tokenizer

    g, rng = grammar(), random.Random(0)

    def example():
        parts = [[g.capital(x) for x in g.pair(rng, rng.random() < 0.5)] for _ in range(rng.choice([1, 1, 2, 3, 4]))]
        return {"source": " ".join(p[0] for p in parts), "target": " ".join(p[1] for p in parts)}

    for f, n in ((train, 4000), (valid, 200)):
        f.write_text("".join(json.dumps(example(), ensure_ascii=False) + "\n" for _ in range(n)))
    tok_dir = train_tokenizer([str(train)], str(root / "tok"), vocab_size=2000)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**{**CONFIG, "vocab_size": len(tok)}))
    model.save_pretrained(init)
    tok.save_pretrained(init)
    return train, valid, init


def run_hpctrain(train: Path, valid: Path, init: Path, steps: int, root: Path, seed: int = 0,
                 micro_batch: int = BATCH) -> dict:
    run = root / f"hpctrain-{time.time_ns()}"
    spec = {"name": "bench-seq2seq", "run_dir": str(run), "task": "finetune", "model": {"path": str(init)},
            "finetune": {"kind": "seq2seq", "method": "full", "train_file": str(train), "valid_file": str(valid),
                         "source_len": LEN, "target_len": LEN, "metrics": ["bleu"],
                         "generation": {"num_beams": 1, "max_new_tokens": NEW}, "predictions_logged": 0},
            "training": {"global_batch": BATCH, "micro_batch": micro_batch, "steps": steps, "lr": LR,
                         "warmup_steps": WARMUP, "weight_decay": 0.0, "betas": [0.9, 0.999], "grad_clip": 1.0,
                         "eval_every": None, "log_every": 1, "seed": seed},
            "checkpoint": {"every_steps": 100_000},
            "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    recs = run_spec(spec, root)
    done = [r for r in recs if "loss" in r]
    wall = (done[-1]["time"] - done[0]["time"]) * len(done) / (len(done) - 1)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in done)
    bleu = [r["bleu"] for r in recs if "bleu" in r][-1]
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(tokens / wall, 1), "bleu": round(bleu, 2),
            "steps": len(done)}


def run_hf(train: Path, valid: Path, init: Path, steps: int, root: Path, seed: int = 0) -> dict:
    import sacrebleu
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    tok = AutoTokenizer.from_pretrained(init)
    eos = tok.eos_token_id

    def enc(f):  # what hpctrain feeds: each side ending in the end-of-sequence token
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        return [{"input_ids": (tok(r["source"])["input_ids"] + [eos])[:LEN],
                 "attention_mask": [1] * min(len(tok(r["source"])["input_ids"]) + 1, LEN),
                 "labels": (tok(text_target=r["target"])["input_ids"] + [eos])[:LEN]} for r in rows], rows

    train_ds, _ = enc(train)
    valid_ds, valid_rows = enc(valid)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(init)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = Seq2SeqTrainingArguments(
        output_dir=str(root / "hf"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        max_steps=steps, learning_rate=LR, warmup_steps=WARMUP, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, lr_scheduler_type="cosine", save_strategy="no", eval_strategy="no",
        logging_strategy="no", report_to=[], seed=seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        predict_with_generate=True, generation_max_length=NEW, generation_num_beams=1)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=DataCollatorForSeq2Seq(tok, model=model), callbacks=[Clock()])
    trainer.train()
    wall = (times[-1] - times[0]) * len(times) / (len(times) - 1)
    seen = BATCH * steps  # examples drawn, epochs over the shuffled set
    mean_tokens = sum(len(x["input_ids"]) + len(x["labels"]) for x in train_ds) / len(train_ds)
    pred = trainer.predict(valid_ds, max_new_tokens=NEW)
    ids = [[t for t in row if t >= 0] for row in pred.predictions.tolist()]
    hyps = [s.strip() for s in tok.batch_decode(ids, skip_special_tokens=True)]
    bleu = sacrebleu.corpus_bleu(hyps, [[r["target"] for r in valid_rows]]).score
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(seen * mean_tokens / wall, 1), "bleu": round(bleu, 2),
            "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated data-order seeds, each side trained once per seed")
    ap.add_argument("--micro-batch", type=int, default=BATCH,
                    help=f"hpctrain's micro-batch (the step stays {BATCH} examples, as HF's)")
    ap.add_argument("--only", choices=["hpctrain", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-seq2seq")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    train, valid, init = build(root)
    if args.only:  # one contender in its own process
        mine = {"micro_batch": args.micro_batch} if args.only == "hpctrain" else {}
        fn = run_hpctrain if args.only == "hpctrain" else run_hf
        print(json.dumps(fn(train, valid, init, args.steps, root, int(args.seeds), **mine)))
        return
    import torch

    print(f"4000 training / 200 validation pairs, {args.steps} steps of {BATCH}, {torch.get_num_threads()} "
          "thread(s)", flush=True)
    results: dict[str, list[dict]] = {"hpctrain": [], "hf": []}
    seeds = [int(x) for x in args.seeds.split(",")]
    for r in range(args.rounds):
        for seed in seeds:
            for who in (["hpctrain", "hf"] if r % 2 == 0 else ["hf", "hpctrain"]):
                cmd = [sys.executable, __file__, "--only", who, "--steps", str(args.steps), "--out", str(root),
                       "--seeds", str(seed), "--micro-batch", str(args.micro_batch)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
                results[who].append({**json.loads(out.strip().splitlines()[-1]), "seed": seed})
                print(f"round {r} seed {seed} {who}: {results[who][-1]}", flush=True)
    ours = max(x["real_tokens_per_s"] for x in results["hpctrain"])
    theirs = max(x["real_tokens_per_s"] for x in results["hf"])
    mean_bleu = {who: round(sum(x["bleu"] for x in rs) / len(rs), 2) for who, rs in results.items()}
    print(json.dumps({"hpctrain_over_hf_real_tokens_per_s": round(ours / theirs, 3), "mean_bleu": mean_bleu,
                      **results}, indent=2))


if __name__ == "__main__":
    main()
