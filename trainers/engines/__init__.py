"""Engines: how a model is wrapped, stepped, saved and exported, behind one interface.

The loop (trainers/loop.py) and the checkpoint (trainers/checkpoint.py) use `Engine` and
nothing else; where engines differ in what they can do, they say so in `Capabilities`, and
nobody asks an engine what it is. One file per engine:

    ddp.py        plain PyTorch DDP (or one process): whole replicas, rank 0 saves
    deepspeed.py  DeepSpeed ZeRO 1-3: partitioned optimizer state (and parameters at stage 3)
    fsdp.py       PyTorch FSDP2: parameters, gradients and optimizer state sharded, DCP checkpoints

`engine_class(spec)` is the one reader of `engine.type`: the class answers what is asked
before a model exists (a process group, how the model is loaded); `build_engine(spec, model,
dist, ...)` has that class build its engine, its optimizer (fused AdamW, no decay on biases and
norms) and the warmup + decay schedule from the spec.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from hpctrain.launcher.contract.checkpoints import CheckpointMeta
from hpctrain.launcher.contract.spec import RunSpec

if TYPE_CHECKING:
    from hpctrain.trainers.model import HFExport


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do that others cannot."""

    whole_weights: bool
    """Every rank holds every parameter whole through forward and backward (not ZeRO-3, whose
    partitioned weights are gone by the time a custom backward would use them): the CLM loss
    may take the output layer's weight into its own autograd function (trainers/objective.py)."""

    state_on_rank0: bool
    """Rank 0 holds the whole checkpoint state (`state_files`): the checkpoint may copy it to
    host memory and write it in the background while training goes on."""

    saves_in_background: bool = False
    """Every rank can write its own part of a checkpoint in the background after a blocking
    copy (`save_in_background`)."""


class Engine(Protocol):
    """The interface every engine implements:

        with engine.micro_step(sync=last) as module:   # forward; grads sync when `last`
            loss = task.loss(module, batch)
            engine.backward(loss)                       # the engine scales by the accumulation count
        grad_norm = engine.step()                       # clip, optimizer, LR schedule, zero grads
    """

    capabilities: Capabilities

    def micro_step(self, sync: bool) -> AbstractContextManager[torch.nn.Module]:
        """The module to run one micro-batch's forward through (autocast on where the spec asks)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss; the step's gradient is their mean."""

    def step(self) -> float:
        """End of a step: clip, optimizer, LR schedule, zero grads; the pre-clip grad norm."""

    @property
    def lr(self) -> float: ...

    def evaluating(self) -> AbstractContextManager[torch.nn.Module]:
        """The model in eval mode, without gradients; train mode again after."""

    def sampling(self) -> AbstractContextManager[torch.nn.Module]:
        """The model to sample completions from, forward passes only, in the run's precision
        (GRPO): unwrapped under DDP; under ZeRO-3 its weights gathered once for the whole
        generation instead of block by block at every token; under FSDP2 the sharded model
        (each forward gathers, every rank running as many)."""

    def state_files(self, rank: int) -> dict[str, object]:
        """{file name: state} this rank writes into a checkpoint (where `state_on_rank0`)."""

    def save(self, directory: Path, rank: int) -> None:
        """Write this rank's part of a checkpoint into `directory` (every rank calls it)."""

    def save_in_background(self, directory: Path, rank: int) -> Callable[[], None]:
        """Copy this rank's part of a checkpoint and write it from a thread (where
        `saves_in_background`); returns what waits until it is written (on rank 0: until
        every rank's is, with the engine's own index of the files)."""

    def load(self, directory: Path, meta: CheckpointMeta) -> None:
        """Restore from a checkpoint `meta` describes (every rank calls it)."""

    def export(self, out: HFExport) -> None:
        """Every rank calls it; on the rank that writes, the engine calls `out` with the model
        whole, or with its weights gathered a file's worth at a time (`HFExport`)."""

    def frozen(self, model: torch.nn.Module, on_meta: bool = False,
               weights_from: Path | None = None) -> torch.nn.Module:
        """A second model that is never trained (a DPO reference, a reward model), ready for
        forward-only use and held the way the engine holds the one it trains: whole on every
        rank (DDP, ZeRO 1-2), partitioned (ZeRO-3), sharded (FSDP2). Every rank calls it, and
        every rank runs each forward through it (under `torch.no_grad()`); no gradients, no
        optimizer state, nothing of it in a checkpoint."""


class Frozen(torch.nn.Module):
    """A model held for forward passes only (`Engine.frozen`): eval mode, no gradients, and
    the precision the engine trains in (`precision`: a context such as an autocast)."""

    def __init__(self, module: torch.nn.Module, precision: Callable[[], AbstractContextManager] | None = None) -> None:
        super().__init__()
        module.eval()  # (DeepSpeed's engine returns None from eval)
        module.requires_grad_(False)
        self.module = module
        self.training = False
        self._precision = precision or contextlib.nullcontext

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._precision():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> Frozen:  # noqa: ARG002 - never trained
        return self


def adamw(param_groups, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel over all tensors instead of a
    Python loop per tensor; deterministic, so exact resume holds."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def clip_and_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float | None) -> float:
    """The step of an engine that keeps its own optimizer (DDP, fsdp): clip the gradients to
    `grad_clip` (none: measure only), step the optimizer and the LR schedule, drop the gradients;
    returns the pre-clip norm (a sharded model's norm is a DTensor: its whole value)."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def export_in_shards(model, out: HFExport, rank: int, gather: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    """A sharding engine's export: the weights a file's worth at a time (`weight_groups`), each
    tensor gathered whole by every rank (`gather`: a collective; the whole tensor on rank 0,
    None elsewhere), rank 0 writing each file before the next is gathered. No rank holds more
    than a file's worth beyond its shards. Should rank 0's writing fail, it goes on gathering
    with the others before it raises: no rank is left waiting in a collective."""
    from hpctrain.trainers.model import weight_groups

    groups = weight_groups(model, out.max_shard_bytes)
    shards = ({name: gather(t) for name, t in group} for group in groups)
    if rank != 0:
        for _ in shards:
            pass
        return
    try:
        out(model, shards=shards, count=len(groups))
    finally:
        for _ in shards:
            pass


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trained parameters in AdamW groups: weight decay on matrices, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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


class EngineClass:
    """What an engine's class answers before the model exists (`engine_class(spec)`): every
    engine subclasses it and overrides what differs from these defaults (a whole model on
    every rank, nothing to import or set up first)."""

    needs_process_group = False
    """A process group even in one process (DeepSpeed's communication layer and FSDP's device
    mesh need one; DDP in one process runs without)."""

    loads_sharded = False
    """The engine takes the model with its parameters on the meta device and materializes only
    each rank's shards (fsdp); the others take a whole model."""

    @classmethod
    def gathers_by_block(cls, spec: RunSpec, world_size: int) -> bool:  # noqa: ARG003
        """Each rank holds a shard of the weights and gathers a block's at a time (fsdp, ZeRO-3):
        the trainer's malloc setting for those buffers differs (trainers/entry.py)."""
        return False

    @classmethod
    def prepare(cls, spec: RunSpec, dist_info) -> None:
        """Before the trainer's memory baseline: import the engine's library."""

    @classmethod
    def prepare_model_loading(cls, spec: RunSpec, dist_info) -> None:
        """What must be set before the model is built (ZeRO-3: partition weights as they load)."""

    @classmethod
    def build(cls, spec: RunSpec, model, dist_info, total_steps: int, accum: int, trainable_only: bool = False,
              on_meta: bool = False, weights_from: Path | None = None) -> Engine:
        """The engine around `model`, with its optimizer and LR schedule from the spec."""
        raise NotImplementedError


def engine_class(spec: RunSpec) -> type[EngineClass]:
    """The class of the engine the spec names: the one place in the trainers that reads
    `engine.type` (tests/test_layout.py checks it); everything else asks the class or the engine."""
    if spec.engine.type == "fsdp":
        from hpctrain.trainers.engines.fsdp import FSDPEngine

        return FSDPEngine
    if spec.engine.type == "deepspeed":
        from hpctrain.trainers.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    from hpctrain.trainers.engines.ddp import DDPEngine

    return DDPEngine


def config_params(config) -> int:
    """A transformer's parameter count from its config alone (h·V + 12·h²·L, the usual
    estimate): what ZeRO-3's limits are sized with before the model exists."""
    h = getattr(config, "hidden_size", 0) or 0
    return int(h * (getattr(config, "vocab_size", 0) or 0) + 12 * h * h * (getattr(config, "num_hidden_layers", 0) or 0))


def param_numel(p: torch.Tensor) -> int:
    """A parameter's elements, also when ZeRO-3 holds only its partition (`ds_numel`)."""
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_count(model: torch.nn.Module) -> int:
    """Every parameter's elements, also those ZeRO-3 holds only a partition of."""
    return sum(param_numel(p) for p in model.parameters())


def build_engine(spec: RunSpec, model, dist_info, total_steps: int, accum: int,
                 trainable_only: bool = False, on_meta: bool = False, weights_from: Path | None = None) -> Engine:
    """The engine for this spec, with its optimizer and LR schedule.

    trainable_only: checkpoints hold just the trained tensors (LoRA adapters, saved
    modules); the frozen base is rebuilt from the spec on resume. on_meta, weights_from: a
    model built on the meta device (`loads_sharded`), and the HF folder its weights are in.
    """
    return engine_class(spec).build(spec, model, dist_info, total_steps, accum, trainable_only, on_meta,
                                    weights_from)
