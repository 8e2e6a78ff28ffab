"""Engines: how a model is wrapped, stepped, saved and exported. Trainers never ask which.

The interface every engine implements (the loops use nothing else):

    with engine.micro_step(sync=last) as module:   # forward under autocast; grads sync when `last`
        loss = objective(module, batch)
        engine.backward(loss)                       # the engine scales by the accumulation count
    grad_norm = engine.step()                       # clip, optimizer, LR schedule, zero grads
    engine.lr                                       # current learning rate
    with engine.evaluating() as module: ...         # eval mode, no grad, autocast; train mode after
    engine.save(directory, rank) / engine.load(directory)   # called by every rank
    engine.host_state(rank)                         # optional: what save writes, copied to host
                                                    # memory, for a background write
    engine.prepare_host_state(rank)                 # optional: allocate that memory ahead
    engine.export(write)                            # every rank calls it; the engine gathers the
                                                    # full model if it must and calls write(model)
                                                    # on the rank that writes
    engine.trainable_parameters()

`build_engine(spec, model, dist, ...)` builds the optimizer (fused AdamW, no decay on
biases and norms) and the warmup + decay schedule from the spec, then the engine the
spec names: `DDPEngine` (plain PyTorch DDP, or one process) or DeepSpeed ZeRO
(trainers/engine_deepspeed.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.checkpoint import save_tensor_file


def adamw(param_groups, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel over all tensors instead of a
    Python loop per tensor; deterministic, so exact resume holds."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def lr_lambda(spec: RunSpec, total: int) -> Callable[[int], float]:
    """Warmup then cosine/linear decay to min_lr_ratio over the run's `total` steps."""
    t = spec.training

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return f


def build_engine(spec: RunSpec, model, dist_info, total_steps: int, accum: int,
                 trainable_only: bool = False):
    """The engine for this spec, with its optimizer and LR schedule.

    trainable_only: checkpoints hold just the trained tensors (LoRA adapters, saved
    modules); the frozen base is rebuilt from the spec on resume.
    """
    t = spec.training
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.engine.type == "deepspeed":
        from hpctrain.launcher.contract.ds_config import build_ds_config
        from hpctrain.trainers.engine_deepspeed import DeepSpeedEngine, offloaded_adamw

        ds_config = build_ds_config(spec, dist_info.world_size)
        optimizer = offloaded_adamw(ds_config, groups, t.lr, t.betas, t.weight_decay, dist_info.device)
        optimizer = optimizer or adamw(groups, t.lr, t.betas, t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
        return DeepSpeedEngine(model.to(dist_info.device), optimizer, scheduler, ds_config, dist_info,
                               trainable_only)
    optimizer = adamw(groups, t.lr, t.betas, t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    return DDPEngine(model, optimizer, scheduler, t.grad_clip, t.precision, dist_info, accum,
                     trainable_only, compile_model=t.compile)


class DDPEngine:
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
        self._host_copy: dict | None = None  # the last save's host copy, reused by the next
        self._host_prep: threading.Thread | None = None

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

    @contextlib.contextmanager
    def evaluating(self):
        """The unwrapped model in eval mode, without gradients, under the run's autocast."""
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast_ctx():
                yield self.model
        finally:
            self.model.train()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

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

    def _state(self) -> dict:
        return {"model.pt": self._model_state(),
                "optim.pt": {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}}

    def prepare_host_state(self, rank: int) -> None:
        """On a GPU, rank 0: allocate the pinned host memory `host_state` copies into, in a
        thread, once the optimizer has its state (after the first step), so that every save,
        the first included (often the one a preemption asks for, with a grace period running),
        only copies. On an H100 (1.1B model, 13 GB of state) the first save blocked 10.2 s
        pinning that memory; allocated here, it blocks 0.28 s, but the pinning still stalls the
        training thread's CUDA calls while it runs (step 2 took 11.6 s): the cost moves to the
        start of the run, it does not vanish. Not on a CPU: there the copy shares the memory
        training uses, and holding it from step 1 (instead of from the first save) would raise
        the run's peak above `hpctrain plan`'s estimate for runs that save only at the end; the
        first save there blocks 1.05 s instead of 0.30 s (162M model + AdamW).
        A failed allocation only leaves the first save to allocate."""
        if (rank != 0 or self.device.type != "cuda" or self._host_copy is not None
                or self._host_prep is not None):
            return
        layout = host_layout(self._state())  # shapes and dtypes, read in the training thread
        device = self.device

        def allocate() -> None:
            try:
                torch.cuda.set_device(device)  # pinned memory belongs to this GPU's context
                self._host_copy = empty_pinned(layout)
            except Exception:  # noqa: BLE001 - the first save allocates instead
                self._host_copy = None

        self._host_prep = threading.Thread(target=allocate, name="checkpoint-host-memory", daemon=True)
        self._host_prep.start()

    def host_state(self, rank: int) -> dict:
        """What `save` writes, copied to host memory (rank 0; {} elsewhere): training may go on
        while a thread writes it (checkpoint.Checkpointer)."""
        if rank != 0:
            return {}
        if self._host_prep is not None:  # memory allocated ahead (prepare_host_state)
            self._host_prep.join()
            self._host_prep = None
        # the previous copy's memory is reused: no write is in flight when a save begins
        self._host_copy = to_host(self._state(), self._host_copy)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
        return dict(self._host_copy)

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

    def export(self, write: Callable[[torch.nn.Module], None]) -> None:
        """Every rank calls it; rank 0 holds the full model and writes it."""
        if self.rank == 0:
            write(self.model)


def host_layout(obj):
    """A state's structure with each tensor replaced by its (shape, dtype): what `empty_pinned`
    allocates. Other values are left out (`to_host` copies them at each save)."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: host_layout(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [host_layout(v) for v in obj]
    return None


def empty_pinned(layout):
    """Page-locked host tensors for a `host_layout` (resident once allocated), for a GPU's
    non-blocking copies: `to_host(state, into=...)` then only copies."""
    if isinstance(layout, tuple):
        shape, dtype = layout
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    if isinstance(layout, dict):
        return {k: empty_pinned(v) for k, v in layout.items()}
    if isinstance(layout, list):
        return [empty_pinned(v) for v in layout]
    return None


def to_host(obj, into=None):
    """A copy of a state (nested dicts, lists, tensors) that the next optimizer step cannot
    change: every tensor copied into host memory (pinned for a GPU's), every container new.
    `into`, an earlier copy of the same state, is reused tensor by tensor: copying into memory
    already touched is ~3x faster than allocating it (measured on this CPU: 0.3 vs 1.1 s for
    1.9 GB), and the copy is what blocks training."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if isinstance(into, torch.Tensor) and into.shape == t.shape and into.dtype == t.dtype:
            return into.copy_(t, non_blocking=t.is_cuda)
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: to_host(v, into.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(to_host(v, i) for v, i in zip(obj, into, strict=True))
    return copy.deepcopy(obj)
