"""Run under torchrun by test_frozen_model.py: the engine the spec names trains a model and
holds a frozen copy of it (`Engine.frozen`); rank 0 writes what it saw as JSON.

    torchrun --nproc-per-node 2 tests/trainers/frozen_probe.py SPEC OUT
"""

from __future__ import annotations

import json
import sys

import torch

from hpctrain.launcher.contract.spec import load_spec
from hpctrain.trainers.distributed import init_distributed
from hpctrain.trainers.engines import build_engine, engine_class
from hpctrain.trainers.model import build_model


def logits(module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids).logits.float().cpu()


def held_share(module: torch.nn.Module) -> float:
    """The share of the model's elements this rank holds (1.0: whole; ZeRO-3 partitions and
    FSDP2 shards hold about 1/world)."""
    held = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, the whole count in ds_numel
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2: a DTensor shard
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / total


def main(spec_path: str, out: str) -> None:
    spec = load_spec(spec_path)
    engines = engine_class(spec)
    d = init_distributed(always_group=engines.needs_process_group)
    engines.prepare(spec, d)
    engines.prepare_model_loading(spec, d)
    policy = build_model(spec, on_meta=engines.loads_sharded)
    engine = build_engine(spec, policy.model, d, total_steps=4, accum=1, on_meta=policy.on_meta,
                          weights_from=policy.weights_from)
    copy = build_model(spec, on_meta=engines.loads_sharded)
    reference = engine.frozen(copy.model, on_meta=copy.on_meta, weights_from=copy.weights_from)

    ids = torch.arange(2 * 12, dtype=torch.long).reshape(2, 12) % 500 + 3
    with engine.evaluating() as module:
        before = logits(module, ids)
        policy_share = held_share(module)
    ref_before = logits(reference, ids)
    with engine.micro_step(sync=True) as module:
        out_ = module(input_ids=ids, labels=ids)
        engine.backward(out_.loss)
    engine.step()
    with engine.evaluating() as module:
        after = logits(module, ids)
    ref_after = logits(reference, ids)
    seen = {
        "equal_at_step_0": bool(torch.equal(before, ref_before)),
        "max_diff_at_step_0": float((before - ref_before).abs().max()),
        "policy_moved": bool(not torch.equal(before, after)),
        "reference_unchanged": bool(torch.equal(ref_before, ref_after)),
        "reference_trainable": sum(p.numel() for p in reference.parameters() if p.requires_grad),
        "reference_training_mode": reference.training,
        "policy_share": policy_share,
        "reference_share": held_share(reference),
    }
    if d.rank == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
