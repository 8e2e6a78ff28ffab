"""`hpctrain plan`: will this run fit, and with which engine?

Memory per rank = model states + activations.

Model states (bytes per parameter; Ψ all parameters, Ψt trainable, N data-parallel ranks,
p the bytes of a weight as trained, L the largest layer's parameters). DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_...` in
deepspeed/runtime/zero) count, for 16-bit training, 2 bytes of weights plus 18/N:
16-bit gradients (2), fp32 gradients (4), fp32 master weights (4), Adam's moments (8).
We use the same parts, split into trainable and frozen parameters:

    ddp      w·Ψ + 16·Ψt        fp32 weights (autocast keeps them), gradients, DDP's bucket
                                copy of them, Adam's two moments (12·Ψt on one rank: no DDP)
    zero1    p·Ψ + p·Ψt + 16·Ψt/N
    zero2    p·Ψ + (p + 16)·Ψt/N
    zero3    (p·Ψ + (p + 16)·Ψt)/N + 2·p·L     (one layer gathered, with its gradient)
    offload_optimizer: the 16·Ψt/N part lives in host memory instead
    offload_params (zero3): the p·Ψ/N part too
    ZeRO buffers: p·B each for the reduce bucket and the all-gather (1, 2) or prefetch (3)
    bucket, B = min(5e8, Ψ) elements for stages 1 and 2 ("auto" in ds_configs/: DeepSpeed's
    default capped at the model's size), B = min(Ψ, max(h², 2^20)) for stage 3, which also
    gathers up to p·max(Ψ/N, h²) of parameters at once

    fsdp     (w·Ψ + 12·Ψt)/N + 3·p·L   fp32 shards of weights, gradients and Adam's moments; a block
                                gathered with its gradient, the next one prefetched (+ p·Ψ
                                with reshard_after_forward: false)
    fsdp+offload: the shards live in host memory instead

At load (the load/node column), a rank builds the whole model in host memory before the
engine moves or partitions it (w·Ψ per rank), except under fsdp (built on the meta device,
each rank reads only its slices of the safetensors files, mapped: w·Ψ/N; from
`model.config`, w·L/N) and under ZeRO-3 from pretrained weights (partitioned as they load,
a whole layer at a time: w·L; the trainer gives DeepSpeed's transient copies back to the
kernel, see docs/benchmarks.md).
ZeRO-3's buckets are hidden² elements and it gathers at most two blocks' worth of
parameters at once (p·24·h², or the largest parameter where that is more, never more than
p·Ψ/N): the trainer fills DeepSpeed's "auto" values so.

p is 2 with `training.precision: bf16` (DeepSpeed keeps 16-bit weights) and 4 otherwise.
QLoRA's frozen 4-bit linear weights count 0.5 bytes each.

Activations are an estimate, said as such: 34·s·b·h bytes per layer for 16-bit activations
(Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022,
without the 5·a·s² attention-matrix term: PyTorch's SDPA and flash attention keep no s×s
matrix; ×2 for fp32), plus the logits and their gradient in fp32 (s·b·V·12 bytes). With
`training.activation_checkpointing` a recomputed block keeps only its input (2·s·b·h), and
one block at a time holds its full activations again in the backward.

A configuration fits when its estimate is at most FIT_FRACTION of the device's memory
(the rest: allocator fragmentation, the CUDA context, communication buffers).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from hpctrain.launcher.contract.ds_config import zero3_live_parameters
from hpctrain.launcher.contract.errors import EXIT_USER_ERROR, UserError
from hpctrain.launcher.contract.model_size import ModelSize
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.rundir import atomic_write_text
from hpctrain.launcher.contract.spec import RunSpec, spec_to_yaml

FIT_FRACTION = 0.9
GiB = 2**30


@dataclass(frozen=True)
class Estimate:
    name: str  # ddp | zero1 | ... | zero3+offload
    engine: dict  # the spec's engine: section for it
    states: float  # bytes per rank, on the device
    activations: float
    host: float  # bytes per rank in host memory (offload)
    frozen: float = 0.0  # bytes per rank a frozen model of this size adds, held as this engine holds it

    @property
    def device(self) -> float:
        return self.states + self.activations


def model_size(spec: RunSpec) -> ModelSize:
    """Parameter counts from the trainers' model factory, on the meta device (nothing allocated),
    in a subprocess: the launcher reaches the trainers through a command line only. The counts
    are kept in the cache (`size_cache_dir`) under everything they depend on, so `plan` and
    `validate` count a model once."""
    import subprocess
    import sys

    cached = _cache_file(spec)
    if cached is not None:
        try:
            return ModelSize.from_json(cached.read_text())
        except (OSError, ValueError, TypeError):
            pass  # absent, or not ours to trust: counted again and written over
    r = subprocess.run([sys.executable, "-m", "hpctrain.trainers.model_size"], input=spec_to_yaml(spec),
                       capture_output=True, text=True)
    if r.returncode == EXIT_USER_ERROR:
        message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "the model does not build"
        raise UserError(message.removeprefix("hpctrain: error: "))
    if r.returncode != 0:
        raise RuntimeError(f"counting the model's parameters failed:\n{r.stderr.strip()[-3000:]}")
    size = ModelSize.from_json(r.stdout.strip().splitlines()[-1])
    if cached is not None:
        try:
            atomic_write_text(cached, size.to_json())
        except OSError:
            pass  # a cache that cannot be written only costs the next count
    return size


SIZE_CACHE_ENV = "HPCTRAIN_CACHE_DIR"
COUNTED_WITH = ("torch", "transformers", "peft")  # the libraries whose modules build the meta model


def size_cache_dir() -> Path:
    """Where counted models are kept: $HPCTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/hpctrain, else
    ~/.cache/hpctrain; `model-size/` inside."""
    root = os.environ.get(SIZE_CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpctrain"
    return Path(root) / "model-size"


def _cache_file(spec: RunSpec) -> Path | None:
    """The cache file of this spec's counts, named by a hash of all they can depend on: the
    spec's task, model and finetune sections (the data files' names left out, the model
    folder's config.json in place of its path), the trainers' and the contract's source, the
    versions of the libraries that build the model. None where that cannot be known (a model
    folder without config.json: counting says why)."""
    from importlib.metadata import PackageNotFoundError, version

    sections = spec.model_dump(mode="json", include={"task", "model", "finetune"})
    model = sections["model"]
    if model.get("path") is not None:
        try:
            model["path"] = hashlib.sha256((Path(resolve_path(model["path"])) / "config.json").read_bytes()).hexdigest()
        except (OSError, UserError):
            return None
    if isinstance(ft := sections.get("finetune"), dict):
        sections["finetune"] = {k: v for k, v in ft.items() if not k.endswith(("_file", "_files"))}
    h = hashlib.sha256(json.dumps(sections, sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for folder in (here / "contract", here.parent / "trainers"):
        files = sorted(folder.rglob("*.py"))
        if not files:
            return None
        for f in files:
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    for lib in COUNTED_WITH:
        try:
            h.update(f"{lib}={version(lib)};".encode())
        except PackageNotFoundError:
            h.update(f"{lib}=;".encode())
    return size_cache_dir() / f"{h.hexdigest()[:32]}.json"


def checkpointed_layers(spec: RunSpec, layers: int) -> int:
    """How many blocks activation checkpointing recomputes (every k-th, from the first)."""
    t = spec.training
    if t.activation_checkpointing == "none":
        return 0
    every = 1 if t.activation_checkpointing == "full" else t.activation_checkpointing_every
    return -(-layers // every)


def activation_bytes(spec: RunSpec, m: ModelSize) -> float:
    """A block keeps 34·s·b·h bytes (16-bit); a checkpointed one keeps only its input (2·s·b·h),
    and the one being recomputed in the backward holds its full activations again."""
    s = spec.finetune.row_tokens() if spec.task == "finetune" else spec.seq_len
    b, h = spec.training.micro_batch * spec.rows_per_example, m.hidden
    per_layer = 34 * s * b * h
    ckpt = checkpointed_layers(spec, m.layers)
    kept = per_layer * (m.layers - ckpt) + 2 * s * b * h * ckpt + (per_layer if ckpt else 0)
    scale = 1.0 if spec.training.precision == "bf16" else 2.0
    return kept * scale + s * b * m.vocab * 12


def estimates(spec: RunSpec, m: ModelSize, world: int) -> list[Estimate]:
    """Every engine configuration, cheapest in communication first."""
    n = max(world, 1)
    pt = m.trainable
    q = m.quantized
    ddp_w = 2 if spec.model.dtype == "bf16" else 4
    p = 2 if spec.training.precision == "bf16" else 4
    weights_ddp = ddp_w * (m.total - q) + 0.5 * q
    weights = p * (m.total - q) + 0.5 * q  # what DeepSpeed holds (16-bit weights with bf16)
    act = activation_bytes(spec, m)
    opt = 16 * pt / n  # fp32 master, fp32 gradient partition, Adam's moments
    layer = 2 * p * m.largest_layer
    buckets = 2 * p * min(5e8, m.total)
    # ZeRO-3's buckets are sized for the hidden size, and a couple of blocks (or the largest
    # parameter) gathered at once: what the trainer fills in for "auto" (engines/deepspeed.py)
    buckets3 = 2 * p * min(m.total, max(m.hidden * m.hidden, 1 << 20))
    live3 = p * zero3_live_parameters(m.total, m.hidden, n, m.largest_layer)
    ds = lambda stage, **kw: {"type": "deepspeed", "zero_stage": stage, **kw}  # noqa: E731
    # FSDP2 keeps fp32 shards of the weights, gradients and Adam's moments; a block's weights are
    # gathered in the compute dtype for its forward and backward, with its gradient, and the next
    # block's are prefetched; without resharding after the forward every block's stay gathered
    fsdp_shards = (ddp_w * (m.total - q) + 12 * pt) / n
    fsdp_gathered = 3 * p * m.largest_layer + (0 if spec.engine.reshard_after_forward else p * (m.total - q))
    # a frozen model beside it (Engine.frozen: a DPO reference, a reward model): its weights only,
    # whole under DDP and ZeRO 1-2, partitioned under ZeRO-3, sharded under FSDP2 (its gathers
    # reuse the room the trained model's take, one block at a time)
    frozen_fsdp = ddp_w * (m.total - q) / n
    out = [
        Estimate("ddp", {"type": "ddp"}, weights_ddp + (16 if n > 1 else 12) * pt, act, 0.0, weights_ddp),
        Estimate("zero1", ds(1), weights + p * pt + opt + buckets, act, 0.0, weights),
        Estimate("zero2", ds(2), weights + p * pt / n + opt + buckets, act, 0.0, weights),
        Estimate("zero3", ds(3), (weights + p * pt) / n + opt + layer + buckets3 + live3, act, 0.0, weights / n),
        Estimate("zero2+offload_optimizer", ds(2, offload_optimizer="cpu"), weights + p * pt / n + buckets, act,
                 opt, weights),
        Estimate("zero3+offload_optimizer", ds(3, offload_optimizer="cpu"),
                 (weights + p * pt) / n + layer + buckets3 + live3, act, opt, weights / n),
        Estimate("zero3+offload_all", ds(3, offload_optimizer="cpu", offload_params="cpu"),
                 p * pt / n + layer + buckets3 + live3, act, opt + weights / n),
        Estimate("fsdp", {"type": "fsdp"}, fsdp_shards + fsdp_gathered, act, 0.0, frozen_fsdp),
        Estimate("fsdp+offload", {"type": "fsdp", "offload_params": "cpu"}, fsdp_gathered, act, fsdp_shards),
    ]
    if spec.task == "finetune" and spec.finetune.frozen_copy():  # DPO's reference: model, counted in
        out = [replace(e, states=e.states + e.frozen) if e.frozen else replace(e, host=e.host + weights / n)
               for e in out]
    other = other_model_bytes(spec)  # GRPO's reward model: held as the engine holds a frozen model
    if other:
        out = [replace(e, states=e.states + (other / n if e.name.startswith(("zero3", "fsdp")) else other))
               for e in out]
    if spec.task == "finetune" and spec.finetune.generates():  # the KV cache of a generation batch
        out = [replace(e, activations=e.activations + kv_cache_bytes(spec, m)) for e in out]
    return out


def other_model_bytes(spec: RunSpec) -> int:
    """The weights of the models a kind loads besides the policy (GRPO's reward model), from the
    sizes of their weight files (0 where not written yet)."""
    if spec.task != "finetune":
        return 0
    total = 0
    for _, raw in spec.finetune.other_models():
        folder = Path(raw)
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    return total


def kv_cache_bytes(spec: RunSpec, m: ModelSize) -> float:
    """Keys and values of every layer for a micro-batch's completions at full length (an upper
    bound: as many key/value heads as query heads)."""
    p = 2 if spec.training.precision == "bf16" else 4
    rows = spec.training.micro_batch * spec.rows_per_example
    return 2 * m.layers * m.hidden * spec.finetune.row_tokens() * rows * p


def load_bytes(spec: RunSpec, m: ModelSize, engine: dict | None = None) -> float:
    """Host memory per rank while the model is built, before the engine holds it (the engine
    of `engine`, a table row's section, or the spec's own): the whole model, except where it
    is sharded as it loads. fsdp builds on the meta device and reads each rank's slices (a
    shard of the largest layer at a time); ZeRO-3 from pretrained weights partitions each as it
    loads (transformers' zero.Init path: one whole layer at a time, then its partition)."""
    e = engine if engine is not None else spec.engine.model_dump()
    w = 2 if spec.model.dtype == "bf16" else 4
    whole = w * (m.total - m.quantized) + 0.5 * m.quantized
    world = max(spec.cluster.world_size, 1)
    qlora = spec.quantized
    lora = spec.task == "finetune" and spec.finetune.trains.adapter
    if e.get("type") == "fsdp" and not lora:  # its slices of the files (read through a mapping)
        return (whole if spec.model.path is not None else w * m.largest_layer) / world
    if e.get("type") == "deepspeed" and spec.model.path is not None and not qlora and _stage(spec, engine) == 3:
        # a layer gathered whole as it loads, then partitioned; the copies DeepSpeed makes while
        # it flattens them go back to the kernel (the trainer's malloc setting for engines that
        # gather by block), so they do not stay in the rank's peak (the 305M bench, 2 ranks: its
        # peak is 0.90 of plan's total so; 0.73 with a whole model's worth counted here)
        return w * m.largest_layer
    return whole


def _stage(spec: RunSpec, engine: dict | None) -> int:
    """The ZeRO stage of a table row's section, or of the spec's own (its JSON's, if it has one)."""
    if engine is not None:
        return engine.get("zero_stage") or 2
    from hpctrain.launcher.contract.ds_config import zero_choice

    return zero_choice(spec)[0]


def chosen_name(spec: RunSpec) -> str:
    """The table row of the spec's own engine section (for DeepSpeed, what its JSON says where
    the engine fields leave it open: stage, offload)."""
    e = spec.engine
    if e.type == "ddp":
        return "ddp"
    if e.type == "fsdp":
        return "fsdp+offload" if e.offload_params == "cpu" else "fsdp"
    from hpctrain.launcher.contract.ds_config import zero_choice

    stage, offload_optimizer, offload_params = zero_choice(spec)
    if offload_params:
        return "zero3+offload_all"
    if offload_optimizer and stage in (2, 3):
        return f"zero{stage}+offload_optimizer"
    return f"zero{stage}"


def device_memory(spec: RunSpec, override_gb: float | None = None) -> tuple[float | None, str]:
    """(bytes of one rank's device, where that number comes from)."""
    if override_gb is not None:
        return override_gb * GiB, "--gpu-mem"
    if spec.cluster.device_memory_gb is not None:
        return spec.cluster.device_memory_gb * GiB, "cluster.device_memory_gb"
    if spec.cluster.executor == "local":
        if local_nvidia_gpu():
            try:
                import torch

                if torch.cuda.is_available():
                    return float(torch.cuda.get_device_properties(0).total_memory), "this machine's GPU"
            except Exception:  # noqa: BLE001 - no usable CUDA: fall back to host memory
                pass
        avail = _mem_available()
        if avail:
            procs = spec.cluster.procs_per_node
            return avail / procs, f"this machine's available memory / {procs} rank(s)"
    return None, ""


def local_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA driver (its control device), known without importing torch."""
    return Path("/dev/nvidiactl").exists()


def _mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits(e: Estimate, budget: float) -> bool:
    return e.device <= FIT_FRACTION * budget


def warning(spec: RunSpec, world: int) -> str | None:
    """validate's note when the chosen engine will not fit (None when it fits or nothing is known).

    Only where a device's memory is known without cost - `cluster.device_memory_gb`, or a local
    NVIDIA GPU - since counting parameters builds the model on the meta device (seconds).
    """
    if spec.cluster.device_memory_gb is None and not (spec.cluster.executor == "local" and local_nvidia_gpu()):
        return None
    budget, source = device_memory(spec)
    if budget is None:
        return None
    m = model_size(spec)
    rows = estimates(spec, m, world)
    mine = next(e for e in rows if e.name == chosen_name(spec))
    if fits(mine, budget):
        return None
    better = next((e for e in rows if fits(e, budget)), None)
    hint = (f"; {better.name} fits ({_gib(better.device)} per rank): engine: {_inline(better.engine)}"
            if better else "; no engine fits: fewer parameters, a smaller micro_batch or seq_len, or more ranks")
    return (f"warning: {mine.name} needs about {_gib(mine.device)} per rank, more than {FIT_FRACTION:.0%} of "
            f"{_gib(budget)} ({source}){hint} (hpctrain plan SPEC for the table)")


def _gib(b: float) -> str:
    if b < GiB:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / GiB:.2f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"


def _finetune_notes(spec: RunSpec) -> list[str]:
    """What a fine-tuning kind adds: the sequences of a pair, DPO's reference."""
    ft = spec.finetune
    out = []
    if ft.generates():
        out.append(f"a micro batch of {spec.training.micro_batch} prompts is {spec.training.micro_batch * ft.group_size} "
                   f"completions of up to {ft.row_tokens()} tokens (seq_len + max_new_tokens): the activations above "
                   "count them and their KV cache")
        for field, raw in ft.other_models():
            size = other_model_bytes(spec)
            out.append(f"{field}: {_gib(size)} of weights, counted above (whole per rank under DDP and ZeRO 1-2, "
                       "split under ZeRO-3 and FSDP2)" if size else f"{field}: {raw} not written yet, not counted")
    elif spec.rows_per_example > 1:
        out.append(f"a micro batch of {spec.training.micro_batch} pairs is {spec.training.micro_batch * 2} sequences "
                   "(chosen and rejected in one forward): the activations above count them")
    how = ft.reference_kind()
    if how == "model":
        out.append("reference: model: the frozen copy above is counted in the table (device, or host where offloaded)")
    elif how == "adapter":
        out.append("reference: adapter: the policy with its adapters off, nothing added")
    elif how == "precompute":
        pairs = sum(_lines(p) for p in [ft.train_file] + [path for _, path, _ in ft.valid_sets()])
        size = f"{pairs:,} pairs: {_gib(16 * pairs)}" if pairs else "the pairs' files not found here"
        out.append(f"reference: precompute: 16 bytes per pair on every rank and in the run dir's reference/ "
                   f"({size}); one pass of the policy before step 1")
    return out


def _lines(path: str) -> int:
    """Non-empty lines of a file (0 where it cannot be read here)."""
    from hpctrain.launcher.contract.paths import resolve_path

    try:
        with open(resolve_path(path), "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _inline(engine: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in engine.items()) + "}"


def report(spec: RunSpec, gpu_mem_gb: float | None) -> str:
    m = model_size(spec)
    c = spec.cluster
    world = c.world_size
    rows = estimates(spec, m, world)
    budget, source = device_memory(spec, gpu_mem_gb)
    mine = chosen_name(spec)
    lines = [
        f"model: {m.total:,} parameters, {m.trainable:,} trainable"
        + (f", {m.quantized:,} in 4 bits" if m.quantized else "")
        + f"; largest layer {m.largest_layer:,}",
        f"ranks: {c.nodes} node(s) x {c.procs_per_node} = {world}; micro batch {spec.training.micro_batch} x "
        f"seq_len {spec.seq_len}; precision {spec.training.precision}",
        "activations per rank, an estimate (34·s·b·h per layer + logits"
        + (f"; {checkpointed_layers(spec, m.layers)} of {m.layers} blocks recomputed"
           if spec.training.activation_checkpointing != "none" else "")
        + f"): {_gib(rows[0].activations)}",
        "",
        f"{'engine':<26}{'model states':>14}{'per device':>13}{'per node':>12}{'host/node (offload)':>21}"
        f"{'load/node':>12}" + ("   fits" if budget else ""),
    ]
    for e in rows:
        mark = "  <- spec" if e.name == mine else ""
        fit = ("   yes " if fits(e, budget) else "   no  ") if budget else ""
        lines.append(f"{e.name:<26}{_gib(e.states):>14}{_gib(e.device):>13}{_gib(e.device * c.procs_per_node):>12}"
                     f"{_gib(e.host * c.procs_per_node) if e.host else '-':>21}"
                     f"{_gib(load_bytes(spec, m, e.engine) * c.procs_per_node):>12}{fit}{mark}")
    lines.append("")
    lines.append("a frozen model of this size beside it (a DPO reference, a reward model), held as each engine "
                 "holds the one it trains, adds per device: "
                 + ", ".join(f"{e.name} {_gib(e.frozen)}" for e in rows if e.frozen)
                 + " (the offloading rows hold it in host memory)")
    if spec.task == "finetune":
        lines += _finetune_notes(spec)
    load = load_bytes(spec, m)
    lines.append(f"at load, host memory while each rank builds the model (load/node: all its ranks): {_gib(load)} "
                 f"per rank, {_gib(load * c.procs_per_node)} per node; whole on every rank but under fsdp (each "
                 "rank reads its shards) and ZeRO-3 from pretrained weights (partitioned as they load)")
    if budget is None:
        lines.append("device memory unknown: pass --gpu-mem GB (or set cluster.device_memory_gb) to choose")
    else:
        first = next((e for e in rows if fits(e, budget)), None)
        lines.append(f"device memory: {_gib(budget)} ({source}); a row fits at <= {FIT_FRACTION:.0%} of it")
        if first is None:
            lines.append("nothing fits: fewer parameters, a smaller micro_batch or seq_len, or more ranks")
        else:
            lines.append(f"smallest configuration that fits: {first.name}   engine: {_inline(first.engine)}")
    lines.append("model states by DeepSpeed's per-parameter formulas (see `hpctrain plan --help`)")
    return "\n".join(lines)
