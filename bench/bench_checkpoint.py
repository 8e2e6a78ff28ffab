"""Checkpoint stall: how long a save blocks training, synchronous vs in the background.

    .venv/bin/python bench/bench_checkpoint.py --rounds 2

A ~160M-parameter Llama (hidden 768, 12 layers, vocabulary 32,000, untied) with
AdamW state, one process, fp32, trained a few steps (batch 2 x 64), then saved
with the trainer's own `Checkpointer` both ways, interleaved (sync, background,
background, sync, ...): model + optimizer ~1.9 GB on disk. For each save:
the time training was blocked, the whole save's time, and for the background
save the steps trained while the thread wrote and their mean time against
the steps before it (the writer shares the CPU with training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpctrain.trainers.distributed import Dist
    from hpctrain.trainers.engines.ddp import DDPEngine

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                               tie_word_embeddings=False)
    m = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    eng = DDPEngine(m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0, "fp32",
                    Dist(0, 1, 0, 1, torch.device("cpu")))
    return m, eng


def step(eng, batch) -> float:
    t0 = time.perf_counter()
    with eng.micro_step(sync=True) as module:
        logits = module(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        eng.backward(loss)
    eng.step()
    return time.perf_counter() - t0


def one_save(eng, batch, root: Path, background: bool) -> dict:
    from hpctrain.launcher.contract.checkpoints import CheckpointMeta
    from hpctrain.trainers.checkpoint import Checkpointer

    run = Path(tempfile.mkdtemp(dir=root, prefix="ckpt-"))
    saver = Checkpointer(run, 0, keep_last=1, background=background)
    before = [step(eng, batch) for _ in range(3)]
    t0 = time.perf_counter()
    saved = saver.save(eng, CheckpointMeta(step=1, world_size=1, sampler={}))
    blocked = time.perf_counter() - t0
    during = []
    while background and not saver.finished():
        during.append(step(eng, batch))
    saver.wait()
    total = saved.total_s if saved.total_s is not None else blocked
    size = sum(f.stat().st_size for f in saved.path.iterdir())
    shutil.rmtree(run)
    out = {"mode": "background" if background else "synchronous", "blocked_s": round(blocked, 3),
           "save_s": round(total, 3), "gb": round(size / 1e9, 2), "step_s_before": round(statistics.mean(before), 3)}
    if background:
        out.update(steps_during_write=len(during),
                   step_s_during_write=round(statistics.mean(during), 3) if during else None)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/hpctrain-bench-checkpoint")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    m, eng = build()
    n = sum(p.numel() for p in m.parameters())
    print(f"{n / 1e6:.0f}M parameters, {torch.get_num_threads()} thread(s)", flush=True)
    batch = torch.randint(0, 32000, (2, 65))
    rows = []
    for r in range(args.rounds):
        for background in ((False, True) if r % 2 == 0 else (True, False)):
            rows.append(one_save(eng, batch, root, background))
    sync = statistics.median(x["blocked_s"] for x in rows if x["mode"] == "synchronous")
    bg = statistics.median(x["blocked_s"] for x in rows if x["mode"] == "background")
    summary = {"params_m": round(n / 1e6, 1), "blocked_s_synchronous": sync, "blocked_s_background": bg,
               "background_over_synchronous": round(bg / sync, 3), "saves": rows}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
