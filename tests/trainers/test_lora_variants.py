"""LoRA's variants (`lora.use_dora`, `lora.use_rslora`), peft's own implementations: an SFT run
of the tiny Llama trains the DoRA magnitudes beside the LoRA matrices, its adapter export
declares both variants to plain peft, and the merged export computes what base + adapter does."""

from __future__ import annotations

import json

import torch

from tests.conftest import run_cli
from tests.trainers.helpers import losses, sft_spec, write_spec


def test_dora_with_rslora_trains_its_magnitudes_and_merges_to_the_same_function(tmp_path, tiny_llama):
    spec = sft_spec(tmp_path / "run", tiny_llama, "lora", steps=8, eval_every=8)
    spec["finetune"]["lora"].update(use_dora=True, use_rslora=True, modules_to_save=None)
    spec["finetune"].update(seq_len=64, merge=True)
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    ls = losses(tmp_path / "run")
    assert ls[8] < ls[1]
    export = tmp_path / "run" / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = load_file(export / "adapter_model.safetensors")
    magnitudes = [k for k in adapter if "lora_magnitude_vector" in k]
    assert magnitudes and any("lora_A" in k for k in adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, export).eval()
    # a magnitude starts as its weight's column norms: training moved it
    for key in magnitudes[:3]:
        target = key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0] + ".weight"
        assert not torch.allclose(adapter[key], initial[target].norm(dim=1), atol=1e-6), key
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok(["### Prompt:\nWho restarts the scheduler?\n### Response:\n"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, rtol=1e-4, atol=1e-4)
