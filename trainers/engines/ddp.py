"""Plain PyTorch DDP behind the engine interface (trainers/engines/__init__.py); one process
needs no wrapper at all."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hpctrain.launcher.contract.checkpoints import CheckpointMeta
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.checkpoint import save_tensor_file
from hpctrain.trainers.engines import (
    Capabilities,
    EngineClass,
    Frozen,
    adamw,
    clip_and_step,
    lr_lambda,
    param_groups,
)

if TYPE_CHECKING:
    from hpctrain.trainers.model import HFExport


class DDPEngine(EngineClass):
    """Whole replicas on every rank (one process: no DDP wrapper), bf16 by autocast over fp32
    weights where the spec asks."""

    capabilities = Capabilities(whole_weights=True, state_on_rank0=True)

    @classmethod
    def build(cls, spec: RunSpec, model, dist_info, total_steps: int, accum: int, trainable_only: bool = False,
              on_meta: bool = False, weights_from: Path | None = None) -> DDPEngine:  # noqa: ARG003
        assert not on_meta, "DDP takes a whole model"
        t = spec.training
        optimizer = adamw(param_groups(model, t.weight_decay), t.lr, t.betas, t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
        return cls(model, optimizer, scheduler, t.grad_clip, t.precision, dist_info, accum, trainable_only,
                   compile_model=t.compile)

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        grad_clip: float | None,
        precision: str,
        dist_info,
        accum: int = 1,
        trainable_only: bool = False,
        compile_model: bool = False,
    ) -> None:
        self.model = model.to(dist_info.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip = grad_clip
        self.device = dist_info.device
        self.rank = dist_info.rank
        # training runs through the compiled wrapper; state, evaluation and export use the model
        compiled = torch.compile(self.model) if compile_model else self.model
        self.module = DDP(compiled) if dist_info.world_size > 1 else compiled
        self._autocast = precision == "bf16"
        self.accum = accum
        self.trainable_only = trainable_only

    def _autocast_ctx(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast)

    @contextlib.contextmanager
    def micro_step(self, sync: bool):
        """Forward and backward of one micro-batch; gradients all-reduce only when `sync`."""
        no_sync = (
            self.module.no_sync()
            if (isinstance(self.module, DDP) and not sync)
            else contextlib.nullcontext()
        )
        with no_sync, self._autocast_ctx():
            yield self.module

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss; the step's gradient is the mean over
        its `accum` micro-batches (the loop never scales the loss)."""
        (loss / self.accum).backward()

    def step(self) -> float:
        """Clip, optimizer step, LR schedule step; returns the pre-clip grad norm."""
        return clip_and_step(self.model, self.optimizer, self.scheduler, self.grad_clip)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def evaluating(self):
        """The unwrapped model in eval mode, without gradients, under the run's autocast."""
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast_ctx():
                yield self.model
        finally:
            self.model.train()

    @contextlib.contextmanager
    def sampling(self):
        with self._autocast_ctx():
            yield self.model

    def state_files(self, rank: int) -> dict[str, object]:
        """DDP replicas are identical: rank 0 writes the model, optimizer and schedule."""
        if rank != 0:
            return {}
        return {"model.pt": self._model_state(),
                "optim.pt": {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}}

    def save(self, directory: Path, rank: int) -> None:
        for name, state in self.state_files(rank).items():
            save_tensor_file(state, directory / name)

    def _model_state(self) -> dict:
        if not self.trainable_only:
            return self.model.state_dict()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, directory: Path, meta: CheckpointMeta) -> None:  # noqa: ARG002 - any world size
        state = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        if self.trainable_only:
            missing = set(state) - {n for n, _ in self.model.named_parameters()}
            if missing:
                raise RuntimeError(f"checkpoint tensors not in the model: {sorted(missing)[:5]}")
            self.model.load_state_dict(state, strict=False)
        else:
            self.model.load_state_dict(state)
        st = torch.load(directory / "optim.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])

    def export(self, out: HFExport) -> None:
        """Every rank calls it; rank 0 holds the full model and writes it."""
        if self.rank == 0:
            out(self.model)

    def frozen(self, model: torch.nn.Module, on_meta: bool = False,
               weights_from: Path | None = None) -> torch.nn.Module:  # noqa: ARG002
        """Whole on every rank, under the run's autocast (`Engine.frozen`)."""
        assert not on_meta, "DDP takes a whole model"
        return Frozen(model.to(self.device), self._autocast_ctx)
