"""DPO throughput and memory: `hpctrain run` (kind dpo) vs TRL's `DPOTrainer`, same model, pairs,
batch and length, LoRA and full, in one run.

    bash bench/setup.sh          # TRL is a benchmark-only dependency (installed without its deps)
    .venv/bin/python bench/bench_dpo.py [--rounds 1] [--methods lora,full]

Pairs: the 160 shipped training pairs (examples/data/pairs_train.jsonl) plus 80 more drawn from
them, each prompt prefixed with a paragraph of real English (a docstring's first paragraph from
the sources of numpy, torch and the standard library, 20-1,000 characters, seeded): prompts of
~10-260 tokens, responses of a few words, 240 pairs, one epoch of 30 steps of 8 pairs. Model: a
Llama (hidden 256, 4 layers, 4 heads, MLP 688) with MiniLM's WordPiece tokenizer (30,522 tokens,
[SEP] as end of sequence), random weights saved once so both sides load the same ones; fp32,
one process with this machine's threads, lr 5e-6, beta 0.1, sigmoid loss, max length 512. TRL's
defaults of bf16 and gradient checkpointing are turned off so both sides compute the same
thing (fp32, no recomputation).

Both sides get the prompt rendered the same way (hpctrain's plain template, given to TRL as
the prompt text). Reference: LoRA, the policy with its adapters off on both sides; full, TRL's
default (a reference model copy run at every step) and TRL with `precompute_ref_log_probs`,
against hpctrain's default (a pass stored before step 1). Time is wall time of training, the
reference pass included, model loading excluded (hpctrain: from the attempt's start record to
the last step; TRL: `train_runtime`). Real tokens: the non-pad tokens of every pair trained on,
both sides of each pair (each counted by its own tokenization). Peak memory: the process's peak
resident set (ru_maxrss), each contender in its own process. Rounds interleave.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_finetune import docstrings
from bench_trainer import run_spec, tokenizer_path

REPO = Path(__file__).resolve().parents[1]
BATCH, MAX_LEN, LR, BETA = 8, 512, 5e-6, 0.1
CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "max_position_embeddings": 1024}
TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"  # hpctrain's plain template (trainers/tasks/sft.py)


def build(root: Path) -> tuple[Path, Path]:
    """(pairs.jsonl, the model folder), made once under `root`."""
    pairs, model_dir = root / "pairs.jsonl", root / "model"
    if pairs.exists() and (model_dir / "config.json").exists():
        return pairs, model_dir
    import os as _os

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    base = [json.loads(x) for x in (REPO / "examples/data/pairs_train.jsonl").read_text().splitlines()]
    texts = []
    for root_dir in (Path(torch.__file__).parent, Path(_os.__file__).parent):
        texts += docstrings(root_dir, 200, rng)
    rows = base + [rng.choice(base) for _ in range(80)]
    with open(pairs, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**r, "prompt": f"{texts[i % len(texts)]} {r['prompt']}"}) + "\n")
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.cls_token_id, **CONFIG)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return pairs, model_dir


def run_hpctrain(pairs: Path, model_dir: Path, method: str, root: Path) -> dict:
    n = sum(1 for _ in open(pairs))
    run = root / f"hpctrain-{method}-{time.time_ns()}"
    spec = {"name": "bench-dpo", "run_dir": str(run), "task": "finetune", "model": {"path": str(model_dir)},
            "finetune": {"kind": "dpo", "method": method, "train_file": str(pairs), "valid_fraction": 0,
                         "seq_len": MAX_LEN, "beta": BETA,
                         "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}},
            "training": {"global_batch": BATCH, "micro_batch": BATCH, "steps": n // BATCH, "lr": LR,
                         "warmup_steps": 0, "weight_decay": 0.0, "eval_every": None, "log_every": 1, "seed": 0},
            "checkpoint": {"every_steps": 100_000},
            "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    recs = run_spec(spec, root)
    start = next(r for r in recs if "mem_base_mib" in r)
    steps = [r for r in recs if "loss" in r]
    wall = steps[-1]["time"] - start["time"]
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(steps[-1]["tokens_seen"] / wall, 1),
            "pairs_per_s": round(len(steps) * BATCH / wall, 2), "steps": len(steps),
            "last_loss": round(steps[-1]["loss"], 4)}


def run_trl(pairs: Path, model_dir: Path, method: str, precompute: bool, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in open(pairs)]
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                 target_modules="all-linear")
    args = DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_steps=len(rows) // BATCH, learning_rate=LR, warmup_steps=0, weight_decay=0.0,
                     lr_scheduler_type="cosine", beta=BETA, loss_type="sigmoid", max_length=MAX_LEN,
                     precompute_ref_log_probs=precompute, save_strategy="no", eval_strategy="no",
                     bf16=False, gradient_checkpointing=False,  # as hpctrain runs here: fp32, no recompute
                     logging_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    out = trainer.train()
    ds = trainer.train_dataset  # prompt_ids apart from chosen_ids and rejected_ids (the completions)
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
        ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True))
    wall = out.metrics["train_runtime"]
    return {"wall_s": round(wall, 1), "real_tokens_per_s": round(real / wall, 1),
            "pairs_per_s": round(len(rows) / wall, 2), "steps": out.global_step,
            "last_loss": round(out.training_loss, 4)}


def one(who: str, method: str, root: Path) -> dict:
    pairs, model_dir = build(root)
    if who == "hpctrain":
        res = run_hpctrain(pairs, model_dir, method, root)
    else:
        res = run_trl(pairs, model_dir, method, who == "trl-precompute", root)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # hpctrain trains in a child process
    return {**res, "peak_rss_mib": round(max(own, kids) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-dpo")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.only:  # one contender in its own process: WHO:METHOD
        who, method = args.only.split(":")
        print(json.dumps(one(who, method, root)))
        return
    build(root)
    import torch

    print(f"{sum(1 for _ in open(root / 'pairs.jsonl'))} pairs, {torch.get_num_threads()} thread(s)", flush=True)
    results: dict[str, list[dict]] = {}
    for method in args.methods.split(","):
        peers = ["trl"] + (["trl-precompute"] if method == "full" else [])
        for r in range(args.rounds):
            order = ["hpctrain", *peers] if r % 2 == 0 else [*peers, "hpctrain"]
            for who in order:
                cmd = [sys.executable, __file__, "--only", f"{who}:{method}", "--out", str(root)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
                results.setdefault(f"{who}:{method}", []).append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r} {who} {method}: {results[f'{who}:{method}'][-1]}", flush=True)
    summary = {}
    for key, runs in results.items():
        who, method = key.split(":")
        if who == "hpctrain":
            continue
        ours = max(x["real_tokens_per_s"] for x in results[f"hpctrain:{method}"])
        summary[f"hpctrain_over_{who}_{method}_tokens_per_s"] = round(ours / max(x["real_tokens_per_s"] for x in runs), 2)
    print(json.dumps({**summary, **results}, indent=2))


if __name__ == "__main__":
    main()
