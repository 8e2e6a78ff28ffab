"""Where a GPU training step goes: the same model, batch and optimizer, one variable at a time.

    python bench/bench_gpu_step.py            # on a CUDA machine (about a minute)
    python bench/bench_gpu_step.py --tiny     # the same path with a tiny model (a CPU check)

bench_gpu's ~1.1B Llama (random weights), micro-batch 4 x 2048 tokens, 2 micro-batches
per step, bf16 autocast over fp32 weights, fused AdamW, grad clipping at 1.0. Variants:

- hf:          `model(input_ids, labels=input_ids).loss` (transformers' own shifted loss)
- whole:       hpctrain's Objective without `attach` (whole fp32 logits, then the loss)
- chunked:     hpctrain's Objective as the trainer runs it (the loss in chunks)
- chunked+syncs: chunked, plus the trainer's host reads (each micro-batch's loss, the norm)
- +deterministic: chunked+syncs under the trainer's deterministic-algorithms flag (bitwise
                 resume), the only variant with it on

cuBLAS's workspace is fixed at ":4096:8" for the whole run, as the trainer sets it (without it
the flag makes PyTorch warn on every cuBLAS call); `--no-cublas-config` leaves it unset, as the
trainer did before 2026-11-28 (the H100 run in docs/benchmarks.md), to measure that difference.

Rounds interleave the variants (forward, then reversed order); each step ends with a
device synchronize; printed: the median step time over the timed steps and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from bench_gpu import BIG, MICRO, TINY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="tiny model, seq 64, any device (a check)")
    ap.add_argument("--no-cublas-config", action="store_true",
                    help="leave CUBLAS_WORKSPACE_CONFIG unset (the trainer before 2026-11-28)")
    args = ap.parse_args()
    from hpctrain.trainers.entry import CUBLAS_CONFIG, CUBLAS_DETERMINISTIC

    if args.no_cublas_config:
        os.environ.pop(CUBLAS_CONFIG, None)
    else:  # before any CUDA work: cuBLAS reads it when its first handle is made
        os.environ[CUBLAS_CONFIG] = CUBLAS_DETERMINISTIC
    if args.tiny:
        args.seq = 64
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.trainers.objective import Objective

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    cfg = dict(TINY if args.tiny else BIG)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    spec = spec_from_dict({"name": "bench", "run_dir": "/tmp/bench-step",
                           "model": {"config": {"model_type": "llama"}, "tokenizer": "/unused"},
                           "data": {"corpora": [{"path": "/unused"}], "seq_len": args.seq},
                           "training": {"global_batch": 2 * MICRO, "micro_batch": MICRO, "steps": 1}})
    whole = Objective(spec, None, BIG["vocab_size"])
    chunked = Objective(spec, None, BIG["vocab_size"])
    plain_forward = model.lm_head.forward
    chunked.attach(model)  # the head's forward now takes the loss while `chunked.targets` is set
    batches = [torch.randint(0, BIG["vocab_size"], (MICRO, args.seq + 1)) for _ in range(2)]

    def step(way: str) -> None:
        torch._C._set_deterministic_algorithms(way == "+deterministic", warn_only=True)
        torch._C._set_deterministic_fill_uninitialized_memory(False)  # as the trainer does
        reads, syncs = [], way in ("chunked+syncs", "+deterministic")
        for mb in batches:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                if way == "hf":
                    x = mb[:, :-1].to(dev)
                    loss = model(input_ids=x, labels=x).loss
                elif way == "whole":
                    loss = whole(model, {"tokens": mb}, dev)
                else:
                    loss = chunked(model, {"tokens": mb}, dev)
            (loss / len(batches)).backward()
            if syncs:
                reads.append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if syncs:
            reads.append(float(norm))

    ways = ["hf", "whole", "chunked", "chunked+syncs", "+deterministic"]
    times: dict[str, list[float]] = {w: [] for w in ways}
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        for way in ways if r % 2 == 0 else ways[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.steps + 2):  # 2 warm-up steps
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(way)
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:
                    times[way].append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            peaks[way] = max(peaks.get(way, 0.0), peak)
    tokens = 2 * MICRO * args.seq
    for way in ways:
        med = statistics.median(times[way])
        print(json.dumps({"way": way, "cublas_config": os.environ.get(CUBLAS_CONFIG),
                          "step_s": round(med, 4), "tokens_per_s": round(tokens / med),
                          "spread_s": round(max(times[way]) - min(times[way]), 4),
                          "peak_mem_gib": round(peaks[way], 2)}), flush=True)
    assert model.lm_head.forward is not plain_forward  # the chunked head stayed attached


if __name__ == "__main__":
    main()
