"""`hpctrain plan`'s parameter counts, from the trainers' own model factory on the meta device
(nothing allocated, nothing read but config.json):

    python -m hpctrain.trainers.model_size < spec.yaml     # one JSON line (contract.model_size)

The launcher starts it as a subprocess: it never imports the trainers itself.
"""

from __future__ import annotations

import sys

import torch

from hpctrain.launcher.contract.errors import UserError, run_command
from hpctrain.launcher.contract.model_size import ModelSize
from hpctrain.launcher.contract.spec import RunSpec, spec_from_dict
from hpctrain.trainers.model import auto_class, label_overrides, model_config, quiet_libraries


def count_parameters(spec: RunSpec) -> ModelSize:
    """Parameter counts of the model this spec trains (LoRA adapters included)."""
    ft = spec.finetune if spec.task == "finetune" else None
    labels = None
    if ft is not None:
        labels = ft.head_labels()
    config = model_config(spec, **label_overrides(labels))
    with torch.device("meta"):
        model = auto_class(spec).from_config(config)
        linear_frozen = 0
        if ft is not None and ft.trains.adapter:
            from hpctrain.trainers.peft_model import apply_adapter

            if ft.trains.quantized:  # bitsandbytes quantizes the linear layers but the output head
                linear_frozen = sum(m.weight.numel() for n, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
            unquantized = spec.model_copy(update={"finetune": ft.model_copy(update={"method": "lora"})}) \
                if ft.trains.quantized else spec  # a meta model has nothing to prepare for 4 bits
            model = apply_adapter(model, unquantized, [])
        if ft is not None and ft.trains.partial:
            from hpctrain.trainers.peft_model import apply_freeze

            apply_freeze(model, ft, [])
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    leaf = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
    return ModelSize(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        quantized=linear_frozen,
        largest_layer=max(leaf, default=0),
        hidden=get("hidden_size", "n_embd", "d_model"),
        layers=get("num_hidden_layers", "n_layer"),
        vocab=get("vocab_size"),
    )


def main() -> int:
    import yaml

    quiet_libraries()

    def body() -> None:
        try:
            raw = yaml.safe_load(sys.stdin)
        except yaml.YAMLError as e:
            raise UserError(f"the spec on stdin does not parse ({e})") from None
        print(count_parameters(spec_from_dict(raw, "<stdin>")).to_json())

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
