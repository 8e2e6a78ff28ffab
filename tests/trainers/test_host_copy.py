"""The host copy a background checkpoint writes holds exactly the state at the save, later
steps leave it alone, and the next save reuses its memory (`HostCopy.prepare`, which allocates
it ahead on a GPU, is a no-op here on the CPU)."""

import torch

from hpctrain.trainers.checkpoint import HostCopy
from hpctrain.trainers.distributed import Dist
from hpctrain.trainers.engines.ddp import DDPEngine


def _engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return DDPEngine(model, opt, sched, 1.0, "fp32", Dist(0, 1, 0, 1, torch.device("cpu")))


def _train_step(engine) -> None:
    with engine.micro_step(sync=True) as module:
        engine.backward(module(torch.randn(5, 8)).pow(2).mean())
    engine.step()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_copy_allocated_ahead_holds_the_state_at_each_save():
    engine = _engine()
    _train_step(engine)
    host = HostCopy()
    host.prepare(engine.state_files(rank=0))  # as the trainer does after its first step (GPU only)
    _train_step(engine)
    first = host.take(engine.state_files(rank=0))
    expected = {"model.pt": engine.model.state_dict(),
                "optim.pt": {"optimizer": engine.optimizer.state_dict(),
                             "scheduler": engine.scheduler.state_dict()}}
    assert _same(first, expected)
    # the copy is the state at the save, not a view of it
    frozen = {k: v.clone() for k, v in first["model.pt"].items()}
    _train_step(engine)
    assert all(torch.equal(first["model.pt"][k], frozen[k]) for k in frozen)
    assert not all(torch.equal(first["model.pt"][k], v) for k, v in engine.model.state_dict().items())
    # the next save copies into the same memory and holds the new state
    second = host.take(engine.state_files(rank=0))
    assert second["model.pt"]["0.weight"].data_ptr() == first["model.pt"]["0.weight"].data_ptr()
    assert _same(second["model.pt"], engine.model.state_dict())
    assert second["optim.pt"]["scheduler"]["last_epoch"] == 3


def test_other_ranks_copy_nothing():
    engine = _engine()
    _train_step(engine)
    host = HostCopy()
    host.prepare(engine.state_files(rank=1))
    assert host.take(engine.state_files(rank=1)) == {}
