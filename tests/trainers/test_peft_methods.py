"""PEFT beyond plain LoRA, peft's own implementations: LoRA's variants (`lora.use_dora`,
`lora.use_rslora`) and `method: ia3`. SFT runs of the tiny Llama train what each adds (DoRA's
magnitudes, IA3's scaling vectors) and nothing else, the adapter export declares it to plain
peft, and the merged export computes what base + adapter does."""

from __future__ import annotations

import json

import torch

from tests.conftest import run_cli
from tests.trainers.helpers import metrics_records, sft_spec, write_spec


def test_dora_with_rslora_trains_its_magnitudes_and_merges_to_the_same_function(tmp_path, tiny_llama):
    spec = sft_spec(tmp_path / "run", tiny_llama, "lora", steps=8, eval_every=4)
    spec["finetune"]["lora"].update(use_dora=True, use_rslora=True, modules_to_save=None)
    spec["finetune"].update(seq_len=64, merge=True)
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    val = [x["val_loss"] for x in metrics_records(tmp_path / "run") if "val_loss" in x]
    assert len(val) == 2 and val[-1] < val[0] - 0.1, val  # the same validation set, at steps 4 and 8
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


def test_ia3_trains_only_its_scaling_vectors_and_merges_to_the_same_function(tmp_path, tiny_llama):
    spec = sft_spec(tmp_path / "run", tiny_llama, "ia3", steps=20, eval_every=5, lr=1e-1)
    spec["finetune"].pop("lora")
    spec["finetune"].update(seq_len=64, merge=True)
    spec["cluster"]["procs_per_node"] = 2
    spec["checkpoint"]["every_steps"] = 20
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    val = [x["val_loss"] for x in metrics_records(tmp_path / "run") if "val_loss" in x]
    assert len(val) == 4 and val[-1] < val[0] - 0.1, val  # the same validation set, every 5 steps
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert state and all("ia3_l" in k for k in state)  # the checkpoint holds only what is trained
    export = tmp_path / "run" / "export"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "IA3"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), export).eval()
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert vectors and any(not torch.equal(v, torch.ones_like(v)) for v in vectors)  # they start at 1
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok(["### Prompt:\nWho restarts the scheduler?\n### Response:\n"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, rtol=1e-4, atol=1e-4)
