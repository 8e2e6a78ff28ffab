"""DeepSpeed ZeRO behind the engine interface (trainers/engines/__init__.py).

What differs from DDP, and why (docs/cluster-notes.md, DeepSpeed):
- `engine.backward` already divides by the accumulation count, and `engine.step()` is
  called after every micro-batch (it steps the optimizer and the LR schedule only at
  the window's end): so our `backward` does both and our `step` only reads the norm.
- The optimizer and LR schedule are ours (fused AdamW, warmup + decay), handed to
  DeepSpeed as client objects; batch sizes, clipping and precision come from the spec
  (launcher/contract/ds_config.py).
- `save_checkpoint` is collective (every rank writes its shards, same tag) and goes
  into our atomic `step_N/` folder; `universal_checkpoint_info` rides in the client
  state so the checkpoint can be converted for another data-parallel size.
- Export under ZeRO-3 gathers the partitioned parameters on every rank; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpctrain.launcher.contract.checkpoints import CheckpointMeta
from hpctrain.launcher.contract.ds_config import build_ds_config, zero3_live_parameters, zero_stage
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.engines import (
    Capabilities,
    EngineClass,
    Frozen,
    adamw,
    config_params,
    export_in_shards,
    lr_lambda,
    param_groups,
    param_numel,
)

if TYPE_CHECKING:
    from hpctrain.trainers.model import HFExport

DS_TAG = "ds"  # one DeepSpeed tag per step_N/ folder: our folder names the step
UNIVERSAL_TAG = "ds_universal"  # its conversion for another data-parallel size


ALIGN = 1024
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def fill_bucket_sizes(ds_config: dict, n_params: int, hidden: int | None = None, world: int = 1,
                      largest: int = 0) -> dict:
    """"auto" bucket sizes, sized for the model and the rank count rather than DeepSpeed's
    defaults, which are sized for models larger than one bucket.

    ZeRO 1 and 2: DeepSpeed's default (5e8 elements) capped at the model's size: ZeRO
    allocates its reduction buckets at this size on every micro-step, and 2 GB of fp32 for a
    model of a few thousand parameters made a CPU step take seconds.
    ZeRO-3 (with the model's hidden size): buckets of hidden² elements (transformers' own
    "auto" rule; the model's size when smaller), parameters under 10·hidden elements kept whole,
    and at most a couple of blocks gathered at once, or the largest parameter (`largest`, an
    embedding matrix) where that is more, never more than a rank's share (zero3_live_parameters:
    `stage3_max_live_parameters`, `stage3_max_reuse_distance`; 1e9 by default, the whole of a
    model this size, which held ZeRO-3's peak above DDP's; docs/benchmarks.md). Values the
    config sets itself are kept.
    Rounded up to a multiple of ALIGN: ZeRO-1/2 assert that buckets split evenly (a model
    with an odd parameter count, such as MiniLM with a classifier, failed to start).
    """
    zo = dict(ds_config.get("zero_optimization", {}))
    stage3 = int(zo.get("stage", 0)) == 3 and bool(hidden)
    align = lambda n: int(min(5e8, -(-max(int(n), 1) // ALIGN) * ALIGN))  # noqa: E731
    for key in BUCKET_KEYS:
        if zo.get(key) == "auto":
            zo[key] = align(min(n_params, max(hidden * hidden, 1 << 20)) if stage3 else n_params)
    if stage3:
        live = zero3_live_parameters(n_params, hidden, world, largest)
        zo.setdefault("stage3_param_persistence_threshold", 10 * hidden)
        zo.setdefault("stage3_max_live_parameters", live)
        zo.setdefault("stage3_max_reuse_distance", live)
    return {**ds_config, "zero_optimization": zo}


def import_deepspeed(device: torch.device):
    """`import deepspeed` with its environment set first (the trainer imports it before it
    measures its baseline memory, so the import does not count as the model's)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by `import deepspeed`: no probing
    # DeepSpeed compiles its ops on first use (~80 s): keep them in the venv, built once
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's communication layer compiles a shared-memory all-reduce kernel when it
        # starts on a CPU (30-60 s in a new environment) that only its inference all-reduce
        # calls; training's collectives go through torch.distributed (gloo). Marked unavailable,
        # it is not built (DeepSpeed keeps this table for the process: its own comment says so)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's ZeRO calls torch's collectives by their old names; torch warns at every call
    # (two lines per gather in a rank's log, thousands a run) about something no user can change
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


_LOADING_CONFIG: list = []  # transformers holds it by weak reference: alive for the process


def partition_while_loading(ds_config: dict, device: torch.device) -> None:
    """ZeRO-3 from pretrained weights: tell transformers before the model is built, so that
    `from_pretrained` partitions each weight as it loads it (deepspeed.zero.Init) instead of
    every rank building the whole model in host memory before DeepSpeed partitions it."""
    deepspeed = import_deepspeed(device)
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init reads the world size from DeepSpeed's communication layer: over our process group
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
    _LOADING_CONFIG.append(HfDeepSpeedConfig(ds_config))


def build_cpu_adam() -> None:
    """Build DeepSpeed's CPU Adam kernel into the venv now (tools/setup.sh does, with the
    deepspeed extra): ZeRO-Offload's first step would otherwise compile it, about two minutes
    (longer on a slower CPU) with every rank of the job waiting on the one that builds."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    import_deepspeed(device)
    from deepspeed.ops.op_builder import CPUAdamBuilder

    with contextlib.redirect_stdout(sys.stderr):
        CPUAdamBuilder().load()


def offloaded_adamw(ds_config: dict, groups: list[dict], lr: float, betas, weight_decay: float, device):
    """DeepSpeed's CPU Adam (AdamW mode) when the config offloads the optimizer, else None.

    ZeRO-Offload steps the optimizer on the host, on fp32 partitions in CPU memory; DeepSpeed
    refuses a client optimizer that is not its own CPU Adam there (its C++ kernel is built
    once into the venv: by tools/setup.sh, `build_cpu_adam`, or else at the first step here).
    """
    if (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") != "cpu":
        return None
    import_deepspeed(device)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    with contextlib.redirect_stdout(sys.stderr):  # its build prints progress
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)


_CONFIGS: dict[tuple[int, int], tuple[RunSpec, dict]] = {}


def run_ds_config(spec: RunSpec, world_size: int) -> dict:
    """The run's DeepSpeed config, built once per process (the spec is held beside it, so
    the key stays that spec's)."""
    key = (id(spec), world_size)
    if key not in _CONFIGS:
        _CONFIGS[key] = (spec, build_ds_config(spec, world_size))
    return _CONFIGS[key][1]


def _sized_for(ds_config: dict, model: torch.nn.Module, world: int) -> dict:
    """`fill_bucket_sizes` from the built model's own sizes."""
    sizes = [param_numel(p) for p in model.parameters()]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return fill_bucket_sizes(ds_config, sum(sizes), hidden, world, max(sizes, default=0))


class DeepSpeedEngine(EngineClass):
    """DeepSpeed ZeRO 1-3 over all ranks: optimizer state (and gradients at 2, parameters at 3)
    partitioned; our optimizer and LR schedule handed to DeepSpeed as client objects."""

    needs_process_group = True  # DeepSpeed's communication layer runs over a process group

    @classmethod
    def gathers_by_block(cls, spec: RunSpec, world_size: int) -> bool:
        return zero_stage(run_ds_config(spec, world_size)) == 3

    @classmethod
    def prepare(cls, spec: RunSpec, dist_info) -> None:  # noqa: ARG003
        import_deepspeed(dist_info.device)

    @classmethod
    def prepare_model_loading(cls, spec: RunSpec, dist_info) -> None:
        """ZeRO-3 from pretrained weights partitions them as they load (no rank builds the whole
        model). Not for a model from `model.config` (its initialization stays that of every
        other engine) nor for QLoRA (its 4-bit weights are bitsandbytes', loaded whole)."""
        if spec.model.path is None or spec.quantized:
            return
        ds_config = run_ds_config(spec, dist_info.world_size)
        if zero_stage(ds_config) != 3:
            return
        from hpctrain.trainers.model import model_config

        config = model_config(spec)
        hidden = getattr(config, "hidden_size", None)
        largest = (getattr(config, "vocab_size", 0) or 0) * (hidden or 0)  # the embedding matrix
        partition_while_loading(fill_bucket_sizes(ds_config, config_params(config), hidden, dist_info.world_size,
                                                  largest), dist_info.device)

    @classmethod
    def build(cls, spec: RunSpec, model, dist_info, total_steps: int, accum: int, trainable_only: bool = False,
              on_meta: bool = False, weights_from: Path | None = None) -> DeepSpeedEngine:  # noqa: ARG003
        assert not on_meta, "DeepSpeed takes a whole model (ZeRO-3 partitions it as it loads)"
        t = spec.training
        ds_config = run_ds_config(spec, dist_info.world_size)
        groups = param_groups(model, t.weight_decay)
        optimizer = offloaded_adamw(ds_config, groups, t.lr, t.betas, t.weight_decay, dist_info.device)
        optimizer = optimizer or adamw(groups, t.lr, t.betas, t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
        return cls(model.to(dist_info.device), optimizer, scheduler, ds_config, dist_info, trainable_only)

    def __init__(self, model, optimizer, scheduler, ds_config: dict, dist_info,
                 trainable_only: bool = False) -> None:
        deepspeed = import_deepspeed(dist_info.device)
        from deepspeed.utils import logger

        ds_config = _sized_for(ds_config, model, dist_info.world_size)
        for h in logger.handlers:  # DeepSpeed logs to stdout, our console: keep it in the rank log
            if isinstance(h, logging.StreamHandler):
                h.setStream(sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # op builds print their progress
            self.ds, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                dist_init_required=False,
            )
        self.stage = int(ds_config["zero_optimization"]["stage"])
        self.ds_config = ds_config
        self.capabilities = Capabilities(whole_weights=self.stage != 3, state_on_rank0=False)
        self.rank, self.world_size = dist_info.rank, dist_info.world_size
        self.device = dist_info.device
        self.trainable_only = trainable_only  # LoRA: checkpoints leave out the frozen base

    @contextlib.contextmanager
    def micro_step(self, sync: bool):  # noqa: ARG002 - DeepSpeed knows the accumulation boundary
        yield self.ds

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)
        self.ds.step()

    def step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @contextlib.contextmanager
    def evaluating(self):
        self.ds.eval()
        try:
            with torch.no_grad():
                yield self.ds
        finally:
            self.ds.train()

    @contextlib.contextmanager
    def sampling(self):
        """Stages 1-2: the model; ZeRO-3: every weight gathered once, its hooks off while
        sampling (DeepSpeed's `unwrap_model_for_generation`), partitioned again after."""
        if self.stage != 3:
            yield self.ds.module
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.ds) as engine:
            yield engine.module

    def state_files(self, rank: int) -> dict[str, object]:
        raise NotImplementedError("every rank writes its own ZeRO shards (state_on_rank0 is False)")

    def save(self, directory: Path, rank: int) -> None:  # noqa: ARG002 - every rank writes shards
        self.ds.save_checkpoint(
            str(directory), tag=DS_TAG,
            client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
            save_latest=False, exclude_frozen_parameters=self.trainable_only,
        )

    def load(self, directory: Path, meta: CheckpointMeta) -> None:
        """Load a checkpoint; one saved by another number of ranks is converted to DeepSpeed's
        universal format first (once, kept beside it) and loaded from there."""
        saved_by = meta.world_size
        tag = DS_TAG
        if saved_by != self.world_size:
            tag = self._universal(Path(directory))
            if self.rank == 0:
                print(f"  ZeRO checkpoint saved by {saved_by} rank(s), now {self.world_size}: "
                      f"loading its universal conversion ({Path(directory) / tag})", flush=True)
            self.ds._config.load_universal_checkpoint = True  # DeepSpeed reads it at load time
        try:
            path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not self.trainable_only)
        finally:
            self.ds._config.load_universal_checkpoint = False  # later saves are ordinary ZeRO
        if path is None:  # DeepSpeed only warns when nothing loaded
            raise RuntimeError(f"DeepSpeed found no checkpoint in {Path(directory) / tag}")

    def _universal(self, directory: Path) -> str:
        """Convert `directory/ds` to `directory/ds_universal` (rank 0, atomically); all ranks wait."""
        final, tmp = directory / UNIVERSAL_TAG, directory / f".{UNIVERSAL_TAG}.tmp"
        if self.rank == 0 and not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"converting {directory / DS_TAG} to DeepSpeed's universal format", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(directory / DS_TAG), "--output_folder", str(tmp)],
                           check=True, stdout=sys.stderr)
            (directory / "latest_universal").unlink(missing_ok=True)  # we load by explicit tag
            os.rename(tmp, final)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return UNIVERSAL_TAG

    def export(self, out: HFExport) -> None:
        """Under ZeRO-3 every rank gathers the weights a file's worth at a time, one tensor after
        another, and rank 0 writes them (an adapter: only its weights are gathered, at once);
        at stages 1-2 rank 0 holds the whole model and writes it."""
        module = self.ds.module
        if self.stage != 3:
            if self.rank == 0:
                out(module)
            return
        import deepspeed

        if self.trainable_only:
            trainable = [p for p in module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if self.rank == 0:
                    out(module)
            return

        def gather(t: torch.Tensor) -> torch.Tensor | None:
            with deepspeed.zero.GatheredParameters([t] if hasattr(t, "ds_id") else [], modifier_rank=None):
                return t.detach().to("cpu", copy=True) if self.rank == 0 else None

        export_in_shards(module, out, self.rank, gather)

    def frozen(self, model: torch.nn.Module, on_meta: bool = False,
               weights_from: Path | None = None) -> torch.nn.Module:  # noqa: ARG002
        """Partitioned like the trained model under ZeRO-3 (a DeepSpeed engine without an
        optimizer: its forward gathers a block's weights at a time); whole on every rank, in
        the run's precision, at stages 1-2, whose partitions are optimizer state only."""
        assert not on_meta, "DeepSpeed takes a whole model"
        bf16 = bool(self.ds_config.get("bf16", {}).get("enabled"))
        if self.stage != 3:
            return Frozen(model.to(self.device, torch.bfloat16 if bf16 else None))
        import deepspeed

        config = {k: v for k, v in _sized_for(self.ds_config, model, self.world_size).items()
                  if k not in ("optimizer", "scheduler", "gradient_clipping")}
        with contextlib.redirect_stdout(sys.stderr):
            held, _, _, _ = deepspeed.initialize(model=model.requires_grad_(False).to(self.device), config=config,
                                                 dist_init_required=False)
        return Frozen(held)
