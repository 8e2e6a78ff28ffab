"""Fused GPU kernels (`training.kernels`): Liger-Kernel's RMSNorm, RoPE and SwiGLU in place of
the model's own modules, where a CUDA device, the package (extra `gpu`) and the architecture
allow; PyTorch's kernels otherwise, the path every CPU run takes.

Liger is Triton only: nothing here imports it unless the run is on CUDA. The loss stays ours
(the chunked CLM loss of trainers/objective.py, which never holds a micro-batch's logits), so
Liger's own cross-entropy kernels are not used.
"""

from __future__ import annotations

import importlib.util

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import RunSpec

LIGER_PATCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def kernel_choice(want: str, device_type: str, have_liger: bool) -> tuple[str, str | None]:
    """('liger' | 'torch', a line for the console or None). `liger` asked on a machine without
    CUDA falls back to PyTorch's kernels with a note (the same spec runs on a CPU); asked on
    CUDA without the package, it is a set-up error."""
    if want == "torch":
        return "torch", None
    if device_type != "cuda":
        return "torch", (None if want == "auto" else
                         f"training.kernels: liger runs on CUDA only (Triton); this run is on {device_type}: "
                         "PyTorch's kernels")
    if not have_liger:
        if want == "liger":
            raise UserError("liger-kernel is not installed", field="training.kernels",
                            expected="pip install 'hpctrain[gpu]', or kernels: torch")
        return "torch", None
    return "liger", None


def use_kernels(model: torch.nn.Module, spec: RunSpec, device: torch.device) -> str | None:
    """Patch `model` (or a PEFT model's base) with Liger's kernels where `kernel_choice` says
    so; returns a line for the console, or None."""
    have = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    choice, note = kernel_choice(spec.training.kernels, device.type, have)
    if choice != "liger":
        return note
    from liger_kernel.transformers import monkey_patch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        if spec.training.kernels == "liger":
            raise UserError(f"Liger-Kernel has no kernels for model_type {model_type!r}", field="training.kernels",
                            expected="auto or torch for this model")
        return None
    monkey_patch._apply_liger_kernel_to_instance(model=base, **LIGER_PATCHES)
    return f"kernels: Liger-Kernel's RMSNorm, RoPE and SwiGLU for {model_type}"
