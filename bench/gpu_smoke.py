"""On a CUDA machine, under `torchrun --nproc_per_node N`: the trainers' control collectives
(stop/save flags, loss means, evaluation totals: small CPU tensors) under a NCCL group.

    torchrun --nproc_per_node 1 bench/gpu_smoke.py

Prints what a plain "nccl" group does with a CPU tensor (NCCL refuses it), then runs
hpctrain's own `init_distributed` (always a group, as for DeepSpeed), its `agree_any` and
`mean_over_ranks`, and one DDP step on the GPU; exits non-zero if any of ours fails.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hpctrain.trainers.distributed import agree_any, init_distributed, mean_over_ranks


def plain_nccl_refuses_cpu() -> str:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            device_id=torch.device(f"cuda:{os.environ['LOCAL_RANK']}"))
    try:
        t = torch.ones(1)
        dist.all_reduce(t)
        return f"plain nccl accepted a CPU tensor ({t.item()})"
    except Exception as e:  # noqa: BLE001 -- what NCCL says is the point
        return f"plain nccl, CPU tensor: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        dist.destroy_process_group()


def main() -> None:
    print(plain_nccl_refuses_cpu(), flush=True)
    d = init_distributed("auto", always_group=True)
    print("backend:", dist.get_backend(), "device:", d.device, flush=True)
    flags = agree_any([d.rank == 0, False])
    means = mean_over_ranks([float(d.rank), 2.0])
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8).to(d.device))
    model(torch.randn(4, 8, device=d.device)).sum().backward()
    ok = flags == [True, False] and abs(means[1] - 2.0) < 1e-9 and model.module.weight.grad is not None
    print("agree_any", flags, "mean_over_ranks", means, "DDP grad", model.module.weight.grad.norm().item(),
          "OK" if ok else "FAILED", flush=True)
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
