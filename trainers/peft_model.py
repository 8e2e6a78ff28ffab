"""Fine-tuning models: full, LoRA and QLoRA (4-bit NF4 base through bitsandbytes), and merging.

    export/            LoRA/QLoRA: the adapter in PEFT format (PeftModel.from_pretrained loads it)
                       full: the whole model (save_pretrained); both: tokenizer + labels.json
    export/merged/     with `merge: true` or `hpctrain merge RUN_DIR`: base + adapter merged, HF format
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpctrain.launcher.errors import UserError
from hpctrain.launcher.paths import resolve_path
from hpctrain.launcher.spec import RunSpec
from hpctrain.trainers.model import LABELS_FILE, missing_modules, model_files_errors, save_hf_model


def _auto(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if kind == "sft" else AutoModelForSequenceClassification


def load_base(spec: RunSpec, labels: list[str] | None, pad_id: int | None, quantize: bool):
    """The base model for a fine-tuning run (4-bit NF4 when `quantize`).

    Sets `model.hpctrain_new_modules`: modules the checkpoint lacked and that were freshly
    initialized (a classifier head, BERT's pooler after MLM training). An adapter must
    train and save them, or a reload would initialize them again, differently.
    """

    with model_files_errors(spec):
        return _load_base(spec, labels, pad_id, quantize)


def _load_base(spec: RunSpec, labels: list[str] | None, pad_id: int | None, quantize: bool):
    from transformers import AutoConfig

    ft = spec.finetune
    kw: dict = {}
    if ft.kind == "classify":
        kw.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={n: i for i, n in enumerate(labels)})
    if spec.model.path is not None:
        path = resolve_path(spec.model.path, field="model.path")
        if quantize:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        model, info = _auto(ft.kind).from_pretrained(path, local_files_only=True, output_loading_info=True, **kw)
        model.hpctrain_new_modules = missing_modules(info)
        if quantize:
            keep_4bit_layout(model)
    else:
        cfg = dict(spec.model.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, **kw)
        model = _auto(ft.kind).from_config(config)
        model.hpctrain_new_modules = []
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # sequence classification finds the last token by it
    return model


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


def apply_lora(model, spec: RunSpec):
    """Wrap with LoRA adapters; a target module the model lacks is a user error, not a traceback."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    ft = spec.finetune
    new = getattr(model, "hpctrain_new_modules", [])
    if ft.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # freshly initialized modules are trained and saved with the adapter (see load_base)
    to_save = list(ft.lora.modules_to_save or []) + list(new)  # peft matches these as name suffixes
    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM if ft.kind == "sft" else TaskType.SEQ_CLS,
        r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
        target_modules=ft.lora.target_modules, modules_to_save=sorted(set(to_save)) or None,
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        if "target" in str(e).lower() or "module" in str(e).lower():
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"{e}".splitlines()[0][:300], field="finetune.lora.target_modules",
                expected=f"names of linear modules of this model, e.g. {names[:12]}",
            ) from None
        raise


def build_model(spec: RunSpec, labels: list[str] | None, pad_id: int | None):
    ft = spec.finetune
    model = load_base(spec, labels, pad_id, quantize=ft.method == "qlora")
    if ft.method in ("lora", "qlora"):
        model = apply_lora(model, spec)
    return model


def parameter_report(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mem = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    return (f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%), "
            f"weights in memory: {mem / 2**20:.1f} MiB")


def export(model, tokenizer, labels: list[str] | None, directory: Path) -> None:
    """Adapter (PEFT) or full model, plus tokenizer and label map, renamed into place when complete."""
    save_hf_model(model, tokenizer, directory, labels)


def is_adapter(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def load_exported(spec: RunSpec, directory: Path):
    """(model, labels) from an export: full model, or base + adapter."""
    labels = None
    if (directory / LABELS_FILE).is_file():
        labels = json.loads((directory / LABELS_FILE).read_text())["labels"]
    if is_adapter(directory):
        from peft import PeftModel

        base = load_base(spec, labels, None, quantize=False)
        return PeftModel.from_pretrained(base, directory), labels
    return _auto(spec.finetune.kind).from_pretrained(directory, local_files_only=True), labels


def merge(spec: RunSpec, export_dir: Path, tokenizer) -> Path:
    """Merge the adapter into an unquantized copy of the base; save as a full HF model."""
    if not is_adapter(export_dir):
        raise UserError("the export holds no adapter (a full fine-tune needs no merge)", file=str(export_dir))
    model, labels = load_exported(spec, export_dir)
    merged = model.merge_and_unload()
    out = export_dir / "merged"
    export(merged, tokenizer, labels, out)
    return out
