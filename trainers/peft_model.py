"""Fine-tuning models: full, LoRA (DoRA, rsLoRA) and QLoRA (4-bit NF4 base through bitsandbytes),
IA3, prefix tuning, freeze (the parameters it names trained in place), and merging.

    export/            LoRA/QLoRA: the adapter in PEFT format (PeftModel.from_pretrained loads it)
                       full: the whole model (save_pretrained); both: tokenizer + labels.json
    export/merged/     with `merge: true` or `hpctrain merge RUN_DIR`: base + adapter merged, HF format
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.trainers.engines import engine_class, param_numel
from hpctrain.trainers.model import LABELS_FILE, BuiltModel, auto_class, build_model, save_hf_model
from hpctrain.trainers.tasks import kind_task


def apply_adapter(model, spec: RunSpec, new_modules: list[str]):
    """Wrap with the method's peft adapters (LoRA and its variants, IA3, prefix tuning); a target module the
    model lacks is a user error, not a traceback. `new_modules` (freshly initialized: a task
    head) are trained and saved with the adapter."""
    import peft
    from peft import TaskType, get_peft_model, prepare_model_for_kbit_training

    ft = spec.finetune
    if ft.trains.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config_class, kwargs, field = ft.adapter_config()
    to_save = list(kwargs.pop("modules_to_save") or []) + list(new_modules)  # peft matches these as name suffixes
    cfg = getattr(peft, config_class)(task_type=TaskType[kind_task(ft).peft_task_type],
                                      modules_to_save=sorted(set(to_save)) or None, **kwargs)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        if "target" in str(e).lower() or "module" in str(e).lower():
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"{e}".splitlines()[0][:300], field=field,
                expected=f"names of linear modules of this model, e.g. {names[:12]}",
            ) from None
        raise


def apply_freeze(model, ft, new_modules: list[str]) -> str:
    """method freeze: every parameter frozen but those of the top (bottom, negative) N transformer
    blocks, those whose names `trainable_modules` regexes match, and the new task head. What it
    trains, in a line; a depth past the model's, a regex matching nothing or nothing trained is a
    user error naming the field."""
    import re

    from hpctrain.trainers.model import transformer_blocks

    f = ft.freeze
    params = dict(model.named_parameters())
    names = list(params)
    train: set[int] = set()
    said = []
    if f.trainable_layers:
        blocks = transformer_blocks(model)
        n = f.trainable_layers
        if abs(n) > len(blocks):
            raise UserError(f"trainable_layers {n} is past the model's {len(blocks)} transformer blocks",
                            field="finetune.freeze.trainable_layers",
                            expected=f"1..{len(blocks)} (top) or -1..-{len(blocks)} (bottom)")
        chosen = blocks[-n:] if n > 0 else blocks[:-n]
        train |= {id(p) for b in chosen for p in b.parameters()}
        said.append(f"the {'top' if n > 0 else 'bottom'} {abs(n)} of {len(blocks)} blocks")
    for i, rx in enumerate(f.trainable_modules or []):
        hit = [n for n in names if re.search(rx, n)]
        if not hit:
            raise UserError(f"trainable_modules {rx!r} matches no parameter of {type(model).__name__}",
                            field=f"finetune.freeze.trainable_modules.{i}",
                            expected=f"a regex searched in parameter names such as {names[:3] + names[-3:]}")
        train |= {id(params[n]) for n in hit}
        said.append(f"{rx!r} ({len(hit)} tensors)")
    for mod in new_modules:  # a new task head learns from scratch: always trained
        train |= {id(p) for n, p in params.items() if n.startswith(f"{mod}.") or f".{mod}." in n}
    if new_modules:
        said.append(f"the new {', '.join(new_modules)}")
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    if not train:
        raise UserError("method freeze trains nothing here", field="finetune.freeze",
                        expected="trainable_layers and/or trainable_modules naming parameters of the model")
    return "trains " + ", ".join(said) + "; the rest frozen"


def build_finetune_model(spec: RunSpec, labels: list[str] | None, pad_id: int | None) -> BuiltModel:
    """The model a fine-tuning run trains: the factory's base, wrapped in LoRA adapters for
    lora and qlora (the latter on a 4-bit base)."""
    ft = spec.finetune
    config_file = Path(resolve_path(spec.model.path), "config.json") if spec.model.path else None
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        problem = ft.architecture_problem(config) or ft.model_problem(config)
        if problem:
            raise UserError(problem, file=str(config_file), field="model.path",
                            expected=f"a model fit for kind {ft.kind}")
    # a full fine-tune under fsdp is built on the meta device (each rank materializes its shards);
    # LoRA adapters are made whole on every rank, so their base is too (then sharded)
    on_meta = engine_class(spec).loads_sharded and not ft.trains.adapter
    built = build_model(spec, labels, pad_id, quantize=ft.trains.quantized, on_meta=on_meta)
    if ft.trains.adapter:
        built = BuiltModel(apply_adapter(built.model, spec, built.new_modules), built.new_modules)
    if ft.trains.partial:
        built.trains = apply_freeze(built.model, ft, built.new_modules)
    return built


def parameter_report(model) -> str:
    total = sum(param_numel(p) for p in model.parameters())
    trainable = sum(param_numel(p) for p in model.parameters() if p.requires_grad)
    mem = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    return (f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%), "
            f"weights in memory: {mem / 2**20:.1f} MiB")


def is_adapter(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def load_exported(spec: RunSpec, directory: Path):
    """(model, labels) from an export: full model, or base + adapter."""
    labels = None
    if (directory / LABELS_FILE).is_file():
        labels = json.loads((directory / LABELS_FILE).read_text())["labels"]
    if is_adapter(directory):
        from peft import PeftModel

        base = build_model(spec, labels).model
        return PeftModel.from_pretrained(base, directory), labels
    return auto_class(spec).from_pretrained(directory, local_files_only=True), labels


@contextlib.contextmanager
def loading_whole():
    """Models built inside are loaded whole in this process, also where ZeRO-3 has told
    transformers to partition weights as they load (a collective every rank would have to join:
    the merge runs on one rank, after the others are done)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter
    held = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)


def merge(spec: RunSpec, export_dir: Path, tokenizer) -> Path:
    """Merge the adapter into an unquantized copy of the base; save as a full HF model."""
    if not is_adapter(export_dir):
        raise UserError("the export holds no adapter (a full fine-tune needs no merge)", file=str(export_dir))
    if spec.finetune.trains.virtual_tokens:
        raise UserError(f"method {spec.finetune.method} (prefix tuning) cannot be merged: its virtual tokens are "
                        "inputs to every layer, not weight updates; the adapter export is what loads (base + "
                        "adapter with peft)", file=str(export_dir))
    with loading_whole():  # one rank merges: its base is loaded whole, never partitioned (ZeRO-3)
        model, labels = load_exported(spec, export_dir)
    merged = model.merge_and_unload()
    out = export_dir / "merged"
    save_hf_model(merged, tokenizer, out, labels)
    return out
