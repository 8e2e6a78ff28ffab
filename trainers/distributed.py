"""Process-group setup and the few collectives the loops need."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", always_group: bool = False) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on GPU); single process works too.

    always_group: make a group even for one rank (DeepSpeed requires one)."""
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # ranks share the cores: oversubscribed BLAS threads make every rank slower. The
        # launcher sets OMP_NUM_THREADS from the CPUs it was given (Slurm's, or this machine's).
        threads = int(env.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1) // local_world
        torch.set_num_threads(max(1, threads))
    if (world > 1 or always_group) and not dist.is_initialized():
        chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        if chosen == "nccl":
            # the control collectives (stop/save flags, loss means, eval totals) are small CPU
            # tensors, which NCCL refuses: they go over gloo, the model's tensors over NCCL
            chosen = "cpu:gloo,cuda:nccl"
        init = None
        if "MASTER_ADDR" not in env:  # one process started without torchrun
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        dist.init_process_group(chosen, init_method=init, rank=rank, world_size=world,
                                device_id=device if cuda and "nccl" in chosen else None)
    return Dist(rank, world, local_rank, local_world, device, int(env.get("GROUP_RANK", 0)))


def rank_cpu_slice(cpus: list[int], local_rank: int, local_world: int) -> list[int]:
    """This rank's contiguous share of its node task's CPUs (pure); when they do not divide,
    the first ranks get one more; with fewer CPUs than ranks, ranks share one each."""
    n = len(cpus)
    if n < local_world:
        return [cpus[local_rank % n]]
    base, extra = divmod(n, local_world)
    start = local_rank * base + min(local_rank, extra)
    return cpus[start:start + base + (local_rank < extra)]


def bind_rank_cpus(local_rank: int, local_world: int) -> list[int]:
    """Pin this rank (and the threads it starts from now on) to its slice of the CPUs Slurm gave
    the node task: run before torch starts any thread pool. The node task's OMP_NUM_THREADS
    (its CPUs / ranks, unless the user set one) sizes the intra-op pool (init_distributed)."""
    mine = rank_cpu_slice(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    os.sched_setaffinity(0, mine)
    return mine


def agree_any(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def from_main_rank(values: list[int]) -> list[int]:
    """Global rank 0's integers on every rank (each above -2**62; others pass as many of
    anything; one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values if dist.get_rank() == 0 else [-(2**62)] * len(values), dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()]


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (in place; one all-reduce): each rank fills its own entries and
    leaves the rest zero to share them, or rank 0 alone fills them to send its values."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_over_ranks(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def eval_slices(n: int, d: Dist, micro: int) -> list[list[int]]:
    """This rank's batches of the items 0..n-1 (strided over ranks), the same number on every rank.

    A rank short of items gets empty batches: it must still run a forward for each, because
    ZeRO-3 gathers each layer's parameters collectively (a missing forward hangs the others).
    """
    mine = list(range(d.rank, n, d.world_size))
    count = math.ceil(math.ceil(n / d.world_size) / micro)
    return [mine[i * micro : (i + 1) * micro] for i in range(count)]
