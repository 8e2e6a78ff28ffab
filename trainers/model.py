"""The model factory and tokenizer loading both trainers (and `hpctrain plan`) use; HF export."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.pickles import unsafe_weight_files
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.engines import param_numel

LABELS_FILE = "labels.json"


def load_tokenizer(spec: RunSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_path(spec.model.tokenizer_path), local_files_only=True
    )


@contextlib.contextmanager
def model_files_errors(spec: RunSpec):
    """Model loading that fails on the user's files (a config transformers refuses, weights that
    are missing or do not fit) is a user error: one line naming the field, exit 2, no retry.
    `validate` refuses these first; this covers files that changed after it ran."""
    field = "model.path" if spec.model.path is not None else "model.config"
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the file system failing (EIO, ENOSPC): not the user's files, maybe transient
        raise UserError(str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__,
                        file=spec.model.path, field=field) from e
    except RuntimeError as e:
        if not any(s in str(e) for s in ("size mismatch", "Error(s) in loading", "ignore_mismatched_sizes")):
            raise
        raise UserError(str(e).strip().splitlines()[0][:400], file=spec.model.path, field=field) from e


def refuse_pickled_code(folder: Path) -> None:
    """A model folder whose pickled weights would call anything but tensor rebuilding is refused
    before transformers reads them (contract/pickles.py; `validate` says the same)."""
    bad = unsafe_weight_files(folder)
    if bad:
        f, why = bad[0]
        raise UserError(f"refused: {why}", file=str(f), field="model.path",
                        expected="safetensors weights, or PyTorch weights holding tensors only")


@dataclass
class BuiltModel:
    """A model as the factory made it, and the modules the checkpoint lacked, which start
    fresh (an MLM head missing from an encoder checkpoint, a classifier head, BERT's pooler):
    reported once on the console, and trained and saved with an adapter (a reload would
    otherwise initialize them again, differently).

    `on_meta`: the parameters are still on the meta device (nothing allocated); the engine
    that shards them materializes its shards and reads them from `weights_from` (an HF folder:
    each rank its slices of the safetensors files) or initializes them (from `model.config`)."""

    model: torch.nn.Module
    new_modules: list[str]
    on_meta: bool = False
    weights_from: Path | None = None
    trains: str = ""  # method freeze: what it trains, said once on the console


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside go to the meta device as they are registered; buffers stay
    real (a rotary table is computed at construction, not loaded). One parameter at a time is
    ever allocated, and freed at once.

    Why `Module.register_parameter` is wrapped for the duration, not `with torch.device("meta")`:
    that context puts buffers on the meta device too, and a model's rotary tables and position
    ids would then be lost (nothing loads them back); accelerate's `init_empty_weights` does
    the same wrapping, and is not a dependency of ours."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def safetensors_keys(folder: Path) -> set[str]:
    """The tensor names of an HF folder's safetensors files (headers only)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            keys.update(st.keys())
    return keys


def checkpoint_key(model, name: str, keys: set[str]) -> str | None:
    """The name a parameter of `model` has in a checkpoint holding `keys` (with or without the
    base model's prefix, as transformers loads a base checkpoint into a model with a head)."""
    prefix = getattr(model, "base_model_prefix", "")
    for k in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if k in keys:
            return k
    return None


def auto_class(spec: RunSpec):
    """The transformers Auto class of this run (the contract's `RunSpec.model_class`)."""
    import transformers

    return getattr(transformers, spec.model_class)


def model_config(spec: RunSpec, **overrides):
    """The model's config: the checkpoint's (`model.path`) or the spec's (`model.config`)."""
    from transformers import AutoConfig

    if spec.model.path is not None:
        path = resolve_path(spec.model.path, field="model.path")
        return AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
    cfg = dict(spec.model.config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg, **overrides)


def label_overrides(labels: list[str] | None) -> dict:
    """Config fields of a classification head over `labels`."""
    if labels is None:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)}}


def weights_dtype(spec: RunSpec) -> dict:
    """Pretraining keeps its weights in `model.dtype`; fine-tuning in the checkpoint loader's
    default (fp32: LoRA's adapters and QLoRA's compute dtype are fp32)."""
    if spec.task == "finetune":
        return {}
    return {"dtype": torch.bfloat16 if spec.model.dtype == "bf16" else torch.float32}


def build_model(spec: RunSpec, labels: list[str] | None = None, pad_id: int | None = None,
                quantize: bool = False, on_meta: bool = False) -> BuiltModel:
    """The model of a run: from `model.path` (pretrained) or `model.config` (from scratch), with
    the run's Auto class, a classification head over `labels`, 4-bit NF4 linear weights when
    `quantize` (QLoRA); with `on_meta`, its parameters left on the meta device for a sharding
    engine to materialize. The one model factory: the trainers and `hpctrain plan` build
    through it."""
    with model_files_errors(spec):
        if on_meta:
            return _build_on_meta(spec, labels, pad_id)
        return _build_model(spec, labels, pad_id, quantize)


def _build_on_meta(spec: RunSpec, labels, pad_id) -> BuiltModel:
    kw = label_overrides(labels)
    config = model_config(spec, **kw)
    with parameters_on_meta():
        model = auto_class(spec).from_config(config, **weights_dtype(spec))
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    apply_activation_checkpointing(model, spec)
    if spec.model.path is None:
        return BuiltModel(model, [], on_meta=True)
    folder = Path(resolve_path(spec.model.path, field="model.path"))
    keys = safetensors_keys(folder)
    if not keys:
        raise UserError("no safetensors weights to load shard by shard", file=str(folder), field="model.path",
                        expected="an HF folder saved with safe_serialization (model*.safetensors)")
    missing = [n for n, _ in model.named_parameters() if checkpoint_key(model, n, keys) is None]
    # what the model computes rather than saves (Marian's sinusoidal positions) is not new
    expected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    missing = [n for n in missing if not any(p.search(n) for p in expected)]
    return BuiltModel(model, sorted({n.rsplit(".", 1)[0] for n in missing}), on_meta=True, weights_from=folder)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model, in order: what activation checkpointing
    recomputes and FSDP shards one by one."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52 checkpoints whole stacks, not blocks
        raise UserError("activation checkpointing needs transformers >= 4.52",
                        field="training.activation_checkpointing", expected="none") from None
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_activation_checkpointing(model, spec: RunSpec) -> int:
    """Recompute the activations of every block (full) or every k-th block (selective) in the
    backward instead of keeping them from the forward; returns how many blocks. The recompute
    runs the same kernels on the same inputs with the forward's RNG state (dropout), so the
    losses are those of a run without it. Non-reentrant checkpointing: frozen inputs (LoRA's
    embeddings) need no gradient for it to work, and engine hooks stay outside the recompute."""
    t = spec.training
    if t.activation_checkpointing == "none":
        return 0
    if not getattr(model, "supports_gradient_checkpointing", False) or not transformer_blocks(model):
        raise UserError(f"{type(model).__name__} does not support activation checkpointing",
                        field="training.activation_checkpointing", expected="none for this model")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    every = 1 if t.activation_checkpointing == "full" else t.activation_checkpointing_every
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i % every == 0
    return sum(b.gradient_checkpointing for b in blocks)


def _build_model(spec: RunSpec, labels, pad_id, quantize) -> BuiltModel:
    auto, kw = auto_class(spec), {**label_overrides(labels), **weights_dtype(spec)}
    if spec.model.path is not None:
        path = resolve_path(spec.model.path, field="model.path")
        refuse_pickled_code(Path(path))
        if quantize:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True, **kw)
        keep_frozen_as_built(model)
        built = BuiltModel(model, missing_modules(info))
        if quantize:
            keep_4bit_layout(model)
    else:
        dtype = kw.pop("dtype", None)
        model = auto.from_config(model_config(spec, **kw), **({"dtype": dtype} if dtype else {}))
        built = BuiltModel(model, [])
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # sequence classification finds the last token by it
    apply_activation_checkpointing(model, spec)
    return built


def keep_frozen_as_built(model) -> None:
    """Parameters the architecture builds frozen (Marian's sinusoidal positions) stay frozen:
    transformers 5's loading hands them back trainable, so a model loaded whole would train what
    the same model built on the meta device (FSDP2, ZeRO-3) does not."""
    with parameters_on_meta():
        bare = type(model)(model.config)
    frozen = {n for n, p in bare.named_parameters() if not p.requires_grad}
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX-512 BF16, a `Linear4bit` whose input needs no gradient and that is in eval
    mode (our validation pass) rewrites its weight in place into a blocked layout and from then on
    computes through a kernel that has no backward: the training steps after the first evaluation
    pass no gradient through the frozen base (measured: the input's gradient is None), and under
    ZeRO-3 the rewritten tensor is not the one DeepSpeed partitioned, so the next gather hands
    back the old layout and saving fails ("packed_weight should be [N, K/2]"). Without the
    repack, evaluation computes the function that is trained, as on every other CPU and GPU.
    """
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the switch Linear4bit.forward reads


def missing_modules(loading_info: dict) -> list[str]:
    """Modules with weights missing from a checkpoint (from `output_loading_info=True`)."""
    return sorted({k.rsplit(".", 1)[0] for k in loading_info.get("missing_keys", [])})


def fresh_modules_note(modules: list[str], why: str) -> str:
    """One console line instead of transformers' load report: what starts fresh, and why."""
    tops = sorted({".".join(m.split(".")[:2]) for m in modules})
    return (
        f"initialized fresh (not in the checkpoint; {why}): {', '.join(tops)} "
        f"({len(modules)} module(s); details in the rank logs)"
    )


def quiet_libraries() -> None:
    """For tools whose stderr is the user's console (merge, eval): transformers' load
    reports, progress bars and deprecation warnings say nothing a user can act on."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def _deepspeed_only_if_imported():
    """`save_pretrained` unwraps the model through accelerate, which imports DeepSpeed whenever
    it is installed (2 s per rank, and its "Setting accelerator" line on the console) to test
    whether the model is a DeepSpeed engine. A model can only be one if DeepSpeed is already
    imported: answer that question from sys.modules while saving."""
    try:
        import accelerate.utils.other as other
    except ImportError:
        yield
        return
    original = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules
    try:
        yield
    finally:
        other.is_deepspeed_available = original


@dataclass
class HFExport:
    """An export in HF format: weights as safetensors (files of at most `max_shard_bytes`, with
    HF's index when there are several), config, tokenizer, label map. Engines call it on the
    rank that writes (`Engine.export`). It is whole or absent: written into a temporary folder
    and renamed into place at the end, a previous export replaced only then."""

    directory: Path
    tokenizer: object = None
    labels: list[str] | None = None
    max_shard_bytes: int = 5000 << 20

    def __call__(self, model, state_dict: dict | None = None, shards: Iterable[dict] | None = None,
                 count: int = 0) -> None:
        """`model` whole (`save_pretrained`), or with its `state_dict` given (an adapter whose
        weights were gathered), or with its weights arriving as `count` `shards`: {name: full
        tensor} per file, gathered one after another by a sharding engine."""
        directory = Path(self.directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with _deepspeed_only_if_imported():
            if shards is None:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=self.max_shard_bytes,
                                      **({"state_dict": state_dict} if state_dict else {}))
            else:  # config and generation config as HF writes them; the weights follow
                model.save_pretrained(tmp, safe_serialization=True, state_dict={})
                write_weight_files(model, shards, count, tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        if self.labels is not None:
            (tmp / LABELS_FILE).write_text(json.dumps({"labels": self.labels}, indent=2))
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)


def save_hf_model(model, tokenizer, directory: Path, labels: list[str] | None = None) -> None:
    """A whole model (one process: a merge, a tool) exported as `HFExport` does."""
    HFExport(Path(directory), tokenizer, labels)(model)


def export_shard_bytes(spec: RunSpec) -> int:
    """The largest weight file of an export (`export.max_shard_mib`)."""
    return int(spec.export.max_shard_mib * 2**20)


def weight_groups(model, max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors a full export writes, in state-dict order and grouped into files of at most
    `max_bytes` (a larger tensor alone): what the model holds for each (an FSDP shard, a ZeRO-3
    partition) and its state-dict name; a tied weight once, under its first name (as HF
    saves it: the input embedding, not the output layer)."""
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    seen: set[int] = set()
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or name in ignore:
            continue
        seen.add(id(t))
        nbytes = param_numel(t) * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += nbytes
    return [g for g in groups if g]


def write_weight_files(model, shards: Iterable[dict], count: int, directory: Path) -> None:
    """Write `count` shards ({name: full tensor}) as HF's safetensors files: `model.safetensors`
    alone, or `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`. A shard is
    written and dropped before the next is gathered."""
    from safetensors.torch import save_file

    try:  # names and layouts transformers changes at load (fused experts ...) go back to the files'
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:
        def revert_weight_conversion(model, state):
            return state
    (directory / "model.safetensors").unlink(missing_ok=True)  # save_pretrained's empty one
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        shard = revert_weight_conversion(model, shard)
        name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(v.numel() * v.element_size() for v in shard.values())
        if count > 1:
            print(f"  export: {name} ({total / 2**30:.2f} GiB written)", flush=True)
        del shard
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per token, torchtitan's count: 6·(N − N_embedding) + 12·L·H·Dh·T.

    N parameters, L layers, H·Dh the hidden size, T the sequence length: 6 FLOPs per
    parameter and token (forward 2, backward 4) for every weight but the embedding lookup,
    plus attention's score and value products, which no parameter counts. A frozen weight
    (the base under LoRA or QLoRA, counted unquantized) costs 4: its backward passes the
    gradient on (2) but computes no weight gradient. Call it before the engine partitions the
    parameters (ZeRO-3).
    """
    cfg = model.config
    emb = model.get_input_embeddings().weight
    trainable = frozen = 0
    seen = {id(emb)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or ".original_module." in name:  # peft keeps an unused copy of a saved module
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += param_numel(p)
        else:
            frozen += _unquantized_numel(p)
    layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)
    return 6.0 * trainable + 4.0 * frozen + 12.0 * layers * hidden * seq_len


def _unquantized_numel(p) -> int:
    """Elements of a weight as the model computes with it (a 4-bit weight packs two per byte)."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return math.prod(qs.shape)
    return param_numel(p)


def mean_context(lengths) -> float:
    """The sequence length an average token attends over when sequences differ in length:
    Σ l² / Σ l (attention costs each token its own sequence's length)."""
    lengths = list(lengths)
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0
