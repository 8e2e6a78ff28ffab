"""CLM loss with a large vocabulary: whole fp32 logits vs the trainer's chunked loss.

    .venv/bin/python bench/bench_clm_loss.py [--vocab 128256 --seq 2048 --batch 2]

A small Llama body (hidden 256, 2 layers) under a Llama-3-sized vocabulary
(128,256), one micro-batch of 2 x 2048 tokens: its logits alone are 2 GiB in
fp32. Each way runs forward + backward twice in a fresh process, and reports
the peak resident memory above the process's memory before the first step,
the step time, and the loss, lm_head and whole-model gradient norms (the same up
to float reassociation). "whole" is the trainer's objective without `attach` (logits
for every token, then fp32 cross-entropy, as before); "chunked" is `attach`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(way: str, vocab: int, seq: int, batch: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.trainers.objective import Objective

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=256, intermediate_size=1024,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=seq, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    spec = spec_from_dict({"name": "bench", "run_dir": "/tmp/bench-clm", "model": {"config": {"model_type": "llama"}, "tokenizer": "/unused"},
                           "data": {"corpora": [{"path": "/unused"}], "seq_len": seq},
                           "training": {"global_batch": batch, "micro_batch": batch, "steps": 1}})
    objective = Objective(spec, None, vocab)
    if way == "chunked":
        objective.attach(model)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    times = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = objective(model, {"tokens": tokens}, torch.device("cpu"))
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "peak_above_base_mib": round((peak - base) / 1024), "step_s": round(min(times), 2),
            "loss": loss.item(), "lm_head_grad_norm": model.lm_head.weight.grad.norm().item(),
            "grad_norm": torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--way", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:
        print(json.dumps(one(args.way, args.vocab, args.seq, args.batch)))
        return
    gib = args.batch * args.seq * args.vocab * 4 / 2**30
    print(f"vocab {args.vocab:,}, micro-batch {args.batch} x {args.seq}: whole fp32 logits {gib:.2f} GiB")
    for way in ("whole", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--vocab", str(args.vocab),
                              "--seq", str(args.seq), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
