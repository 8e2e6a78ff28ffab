"""PyTorch FSDP2 (`fully_shard`) behind the engine interface (trainers/engines/__init__.py).

- Each transformer block is sharded on its own and the root (embeddings, final norm, output
  layer) last: a block's parameters are gathered for its forward and backward only.
- `training.precision: bf16` is a `MixedPrecisionPolicy`: the forward and backward compute with
  bf16 copies of the parameters, gradients are reduced in fp32, and the optimizer steps the
  fp32 shards (no autocast).
- `engine.offload_params: cpu` keeps the parameter and optimizer shards in host memory
  (`CPUOffloadPolicy`); the optimizer steps there. Training on a CPU, they are there already.
- Checkpoints are `torch.distributed.checkpoint` (DCP) folders inside our step folder: every
  rank writes its own shards (in the background with `checkpoint.background`: DCP's async
  save, its collectives on a group of their own), and a checkpoint loads on any number of
  ranks (DCP reshards at load: nothing to convert).
- Export gathers the full state dict on rank 0, in host memory, and writes HF safetensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpctrain.launcher.contract.checkpoints import CheckpointMeta
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.checkpoint import save_tensor_file
from hpctrain.trainers.engines import (
    Capabilities,
    EngineClass,
    Frozen,
    adamw,
    clip_and_step,
    export_in_shards,
    lr_lambda,
    param_groups,
)

if TYPE_CHECKING:
    from hpctrain.trainers.model import HFExport

DCP_DIR = "dcp"  # the DCP checkpoint inside a step folder
SCHEDULER_FILE = "scheduler.pt"  # the LR schedule (rank 0)


def materialize(model: torch.nn.Module, device: torch.device, weights_from: Path | None) -> None:
    """Give a sharded model built on the meta device (`model.parameters_on_meta`) its shards on
    `device`: read from the safetensors files of `weights_from`, each rank only its own slices
    (DCP's Hugging Face reader), and initialized as transformers would where the files lack a
    weight (or everywhere, for a model from `model.config`). No rank holds a whole weight."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader

    from hpctrain.trainers.model import checkpoint_key, safetensors_keys

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT: the HF model
    meta = {n for n, p in hf.named_parameters() if _local(p).is_meta}
    kept = {n: _local(p).detach().clone() for n, p in hf.named_parameters() if n not in meta}  # adapters
    buffers = {n: b.detach().clone() for n, b in hf.named_buffers()}
    model.to_empty(device=device)
    keys = safetensors_keys(weights_from) if weights_from is not None else set()
    source = {n: checkpoint_key(hf, n.replace(".base_layer", ""), keys) for n in meta}
    with torch.no_grad():
        for n, b in hf.named_buffers():
            b.copy_(buffers[n])
        params = dict(hf.named_parameters())
        for n, value in kept.items():
            _local(params[n]).copy_(value)
        fresh = {n for n in meta if source[n] is None}
        for name, module in hf.named_modules():  # transformers' own init, on this rank's shards
            if any((f"{name}.{pn}" if name else pn) in fresh for pn, _ in module.named_parameters(recurse=False)):
                _init_module(hf, module)
        wanted = {source[n]: params[n] for n in meta if source[n] is not None}
        if wanted:
            dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(weights_from)),
                     planner=DefaultLoadPlanner(allow_partial_load=True))


def _init_module(hf, module: torch.nn.Module) -> None:
    """transformers' init of `module`'s parameters on this rank's shards. An init that writes a
    whole tensor (Marian's sinusoidal positions, copied in) runs on a whole-sized stand-in, of
    which each rank keeps its shard (every rank computes the same whole: the same seed)."""
    sharded = {pn: p for pn, p in module.named_parameters(recurse=False) if hasattr(p, "to_local")}
    try:
        hf._init_weights(module)
        return
    except RuntimeError:
        if not sharded:
            raise
    from torch.distributed.tensor import distribute_tensor

    for pn, p in sharded.items():
        module._parameters[pn] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=_local(p).device),
                                                    requires_grad=p.requires_grad)
    try:
        hf._init_weights(module)
        for pn, p in sharded.items():
            _local(p).copy_(distribute_tensor(module._parameters[pn].data, p.device_mesh, p.placements).to_local())
    finally:
        for pn, p in sharded.items():
            module._parameters[pn] = p


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class FSDPEngine(EngineClass):
    """FSDP2 over all ranks: parameters, gradients and optimizer state sharded."""

    capabilities = Capabilities(whole_weights=False, state_on_rank0=False, saves_in_background=True)

    needs_process_group = True  # the device mesh is made over a process group
    loads_sharded = True

    @classmethod
    def gathers_by_block(cls, spec: RunSpec, world_size: int) -> bool:  # noqa: ARG003
        return True

    @classmethod
    def build(cls, spec: RunSpec, model, dist_info, total_steps: int, accum: int, trainable_only: bool = False,
              on_meta: bool = False, weights_from: Path | None = None) -> FSDPEngine:
        return cls(model, spec, dist_info, total_steps, accum, trainable_only, on_meta, weights_from)

    def __init__(self, model, spec: RunSpec, dist_info, total_steps: int, accum: int,
                 trainable_only: bool = False, on_meta: bool = False, weights_from: Path | None = None) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        t = spec.training
        self.spec = spec
        self.device, self.rank, self.accum = dist_info.device, dist_info.rank, accum
        self.grad_clip, self.trainable_only = t.grad_clip, trainable_only
        self.mesh = init_device_mesh(self.device.type, (dist_info.world_size,))
        self.model = self._shard(model, on_meta, weights_from)
        # background saves run their collectives on a group of their own: never interleaved
        # with the training step's collectives on the default group
        self._save_group = torch.distributed.new_group(backend="gloo")
        # the optimizer steps the shards: built once the parameters are sharded
        self.optimizer = adamw(param_groups(self.model, t.weight_decay), t.lr, t.betas, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, total_steps))

    def _shard(self, model: torch.nn.Module, on_meta: bool, weights_from: Path | None) -> torch.nn.Module:
        """Each transformer block sharded on its own, then the root; a model built on the meta
        device gets its shards from `weights_from` (`materialize`)."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        t, e = self.spec.training, self.spec.engine
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if t.precision == "bf16" else MixedPrecisionPolicy())
        # offloading to host memory moves nothing where training runs in host memory (a CPU)
        offloaded = e.offload_params == "cpu" and self.device.type != "cpu"
        offload = CPUOffloadPolicy() if offloaded else OffloadPolicy()
        if not offloaded and not on_meta:
            model = model.to(self.device)
        from hpctrain.trainers.model import transformer_blocks

        blocks = transformer_blocks(model)
        if not blocks:
            from hpctrain.launcher.contract.errors import UserError

            raise UserError(f"{type(model).__name__} has no transformer blocks FSDP can shard",
                            field="engine.type", expected="ddp or deepspeed for this model")
        for block in blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=e.reshard_after_forward, mp_policy=mp,
                        offload_policy=offload)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=e.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
        if on_meta:
            materialize(model, torch.device("cpu") if offloaded else self.device, weights_from)
        return model

    def frozen(self, model: torch.nn.Module, on_meta: bool = False,
               weights_from: Path | None = None) -> torch.nn.Module:
        """Sharded like the trained model, block by block, on the same mesh (`Engine.frozen`)."""
        return Frozen(self._shard(model.requires_grad_(False), on_meta, weights_from))

    @contextlib.contextmanager
    def micro_step(self, sync: bool):  # noqa: ARG002 - every micro-batch reduce-scatters
        """Gradients are reduce-scattered after every micro-batch and accumulate in the shards:
        skipping the reduction until the window's last micro-batch (as DDP does) would keep
        every parameter's whole gradient in memory until then (docs/benchmarks.md: FSDP2's
        peak with each)."""
        yield self.model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> float:
        return clip_and_step(self.model, self.optimizer, self.scheduler, self.grad_clip)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def evaluating(self):
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.train()

    @contextlib.contextmanager
    def sampling(self):
        """The sharded model, its root's parameters (embeddings, final norm, output layer)
        gathered for the whole generation: an encoder-decoder's `generate` runs the encoder
        without the root's forward (whose hook would gather them); each block still gathers
        its own at each forward."""
        self.model.unshard()
        try:
            yield self.model
        finally:
            self.model.reshard()

    def state_files(self, rank: int) -> dict[str, object]:
        raise NotImplementedError("every rank writes its own DCP shards (state_on_rank0 is False)")

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only)

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its shards of the model and optimizer (DCP); rank 0 the schedule."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / DCP_DIR))
        if rank == 0:
            save_tensor_file(self.scheduler.state_dict(), directory / SCHEDULER_FILE)

    def save_in_background(self, directory: Path, rank: int) -> Callable[[], None]:
        """DCP's async save: this rank's shards are copied to host memory now, then written by a
        thread; rank 0's wait also covers DCP's index (.metadata), written once every rank's
        shards are."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        pending = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / DCP_DIR),
                                 process_group=self._save_group)
        if rank == 0:
            save_tensor_file(self.scheduler.state_dict(), directory / SCHEDULER_FILE)
        future = pending if hasattr(pending, "result") else pending.upload_completion
        return future.result

    def load(self, directory: Path, meta: CheckpointMeta) -> None:  # noqa: ARG002 - DCP reshards
        """Load a DCP checkpoint saved by any number of ranks into this run's shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        # an adapter's checkpoint holds only the trained tensors (`ignore_frozen_params`): the frozen
        # base is left as built, not reported missing (dcp.load above refuses a trained key absent)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=replace(self._options(), strict=not self.trainable_only))
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))

    def export(self, out: HFExport) -> None:
        """Every rank gathers the weights a file's worth at a time, one tensor after another,
        and rank 0 writes them; an adapter (only trainable weights) is gathered at once."""
        from torch.distributed.tensor import DTensor

        if self.trainable_only:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
            if self.rank == 0:
                out(self.model, state_dict=full)
            return

        def gather(t: torch.Tensor) -> torch.Tensor | None:
            if isinstance(t, DTensor):  # offloaded shards gather on the device the mesh is on
                t = (t if t.device == self.device else t.to(self.device)).full_tensor()
            return t.detach().to("cpu", copy=True) if self.rank == 0 else None

        export_in_shards(self.model, out, self.rank, gather)
