"""Engines: how a model is wrapped, stepped, saved and exported. Trainers never ask which.

`DDPEngine` is plain PyTorch DDP (or one process). A DeepSpeed engine will
implement the same methods; everything engine-specific lives behind them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainers.checkpoint import save_tensor_file


def adamw(param_groups, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel over all tensors instead of a
    Python loop per tensor; deterministic, so exact resume holds."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


class DDPEngine:
    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        grad_clip: float | None,
        precision: str,
        dist_info,
        trainable_only: bool = False,
    ) -> None:
        # trainable_only: checkpoints hold just the trained tensors (LoRA adapters, saved
        # modules); the frozen base is rebuilt from the spec on resume
        self.model = model.to(dist_info.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip = grad_clip
        self.device = dist_info.device
        self.module = DDP(self.model) if dist_info.world_size > 1 else self.model
        self._autocast = precision == "bf16"
        self.trainable_only = trainable_only

    @contextlib.contextmanager
    def micro_step(self, sync: bool):
        """Forward and backward of one micro-batch; gradients all-reduce only when `sync`."""
        no_sync = (
            self.module.no_sync()
            if (isinstance(self.module, DDP) and not sync)
            else contextlib.nullcontext()
        )
        with (
            no_sync,
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast),
        ):
            yield self.module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, optimizer step, LR schedule step; returns the pre-clip grad norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: Path, rank: int) -> None:
        """DDP replicas are identical: rank 0 writes the model, optimizer and schedule."""
        if rank == 0:
            save_tensor_file(self._model_state(), directory / "model.pt")
            save_tensor_file(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                directory / "optim.pt",
            )

    def _model_state(self) -> dict:
        if not self.trainable_only:
            return self.model.state_dict()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, directory: Path) -> None:
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

    def export(self, directory: Path, tokenizer, rank: int) -> None:
        """HF `save_pretrained` (safetensors) + tokenizer, renamed into place when complete."""
        if rank != 0:
            return
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
