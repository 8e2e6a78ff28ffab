"""GRPO step rate: `hpctrain run` (kind grpo) vs TRL's `GRPOTrainer`, same model, prompts, group
size, lengths and reward, in one run.

    bash bench/setup.sh          # TRL is a benchmark-only dependency (installed without its deps)
    .venv/bin/python bench/bench_grpo.py [--rounds 1] [--steps 8]

Prompts: the 160 shipped SFT prompts (examples/data/sft_train.jsonl) in hpctrain's plain
template (given to TRL as the prompt text). Model: a Llama (hidden 256, 4 layers, 4 heads, MLP
688) with MiniLM's WordPiece tokenizer (30,522 tokens, [SEP] as end of sequence), random weights
saved once so both sides load the same ones; fp32, one process with this machine's threads.
Each step: 8 prompts x 8 completions (TRL's default group), up to 32 new tokens, temperature 1,
one update per generation, a KL penalty of 0.04 to a frozen copy of the initial model (TRL
loads its reference model), the DAPO token-mean loss on both sides; the reward is
bench/grpo_reward.py's (a function, so scoring costs the same on both sides). TRL's defaults of
bf16 and gradient checkpointing are off on both sides. Time: wall time of training, model
loading excluded (hpctrain: from the attempt's start record to the last step; TRL:
`train_runtime`). Completions/s = steps x 64 / time; tokens: every completion's tokens, as
each side counts them. Each contender in its own process; rounds interleave.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_trainer import run_spec, tokenizer_path

REPO = Path(__file__).resolve().parents[1]
PROMPTS, GROUP, NEW, LR, KL = 8, 8, 32, 1e-5, 0.04
CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "max_position_embeddings": 1024}
TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"  # hpctrain's plain template (trainers/tasks/sft.py)


def build(root: Path) -> tuple[Path, Path]:
    """(prompts.jsonl, the model folder), made once under `root`."""
    prompts, model_dir = root / "prompts.jsonl", root / "model"
    if prompts.exists() and (model_dir / "config.json").exists():
        return prompts, model_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    rows = [json.loads(x) for x in (REPO / "examples/data/sft_train.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.cls_token_id, **CONFIG)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return prompts, model_dir


def run_hpctrain(prompts: Path, model_dir: Path, steps: int, root: Path) -> dict:
    run = root / f"hpctrain-{time.time_ns()}"
    spec = {"name": "bench-grpo", "run_dir": str(run), "task": "finetune", "model": {"path": str(model_dir)},
            "finetune": {"kind": "grpo", "method": "full", "train_file": str(prompts), "valid_fraction": 0,
                         "seq_len": 128, "group_size": GROUP, "max_new_tokens": NEW, "kl_coef": KL,
                         "reward_functions": ["grpo_reward:vowel_share"], "group_by_length": False},
            "training": {"global_batch": PROMPTS, "micro_batch": PROMPTS, "steps": steps, "lr": LR,
                         "warmup_steps": 0, "weight_decay": 0.0, "eval_every": None, "log_every": 1, "seed": 0},
            "checkpoint": {"every_steps": 100_000},
            "export": {"enabled": False},
            "cluster": {"procs_per_node": 1}}
    recs = run_spec(spec, root)
    start = next(r for r in recs if "mem_base_mib" in r)
    steps_done = [r for r in recs if "loss" in r]
    wall = steps_done[-1]["time"] - start["time"]
    n = len(steps_done) * PROMPTS * GROUP
    mean_len = sum(r["completions/mean_length"] for r in steps_done) / len(steps_done)
    return {"wall_s": round(wall, 1), "step_s": round(wall / len(steps_done), 2),
            "completions_per_s": round(n / wall, 1), "completion_tokens_per_s": round(n * mean_len / wall, 1),
            "steps": len(steps_done), "mean_reward": round(sum(r["reward"] for r in steps_done) / len(steps_done), 4)}


def run_trl(prompts: Path, model_dir: Path, steps: int, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from grpo_reward import vowel_share
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in open(prompts)]
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"])} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS * GROUP,
                      gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=NEW,
                      temperature=1.0, top_p=1.0, beta=KL, loss_type="dapo", max_steps=steps, learning_rate=LR,
                      warmup_steps=0, weight_decay=0.0, save_strategy="no", eval_strategy="no",
                      bf16=False, gradient_checkpointing=False,  # as hpctrain runs here: fp32, no recompute
                      logging_steps=1, report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
                      disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[vowel_share], args=args, train_dataset=data,
                          processing_class=tok)
    out = trainer.train()
    logs = [x for x in trainer.state.log_history if "completions/mean_length" in x]
    wall = out.metrics["train_runtime"]
    n = out.global_step * PROMPTS * GROUP
    mean_len = sum(x["completions/mean_length"] for x in logs) / max(len(logs), 1)
    return {"wall_s": round(wall, 1), "step_s": round(wall / out.global_step, 2),
            "completions_per_s": round(n / wall, 1), "completion_tokens_per_s": round(n * mean_len / wall, 1),
            "steps": out.global_step, "mean_reward": round(sum(x["reward"] for x in logs) / max(len(logs), 1), 4)}


def one(who: str, steps: int, root: Path) -> dict:
    prompts, model_dir = build(root)
    res = run_hpctrain(prompts, model_dir, steps, root) if who == "hpctrain" else run_trl(prompts, model_dir, steps, root)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # hpctrain trains in a child process
    return {**res, "peak_rss_mib": round(max(own, kids) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-grpo")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.only:  # one contender in its own process
        print(json.dumps(one(args.only, args.steps, root)))
        return
    build(root)
    import torch

    print(f"{PROMPTS} prompts x {GROUP} completions x up to {NEW} tokens per step, {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    results: dict[str, list[dict]] = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])}
    for r in range(args.rounds):
        for who in (["hpctrain", "trl"] if r % 2 == 0 else ["trl", "hpctrain"]):
            cmd = [sys.executable, __file__, "--only", who, "--steps", str(args.steps), "--out", str(root)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env).stdout
            results.setdefault(who, []).append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {who}: {results[who][-1]}", flush=True)
    best = {who: max(x["completions_per_s"] for x in runs) for who, runs in results.items()}
    print(json.dumps({"hpctrain_over_trl_completions_per_s": round(best["hpctrain"] / best["trl"], 2), **results},
                     indent=2))


if __name__ == "__main__":
    main()
