"""PEFT beyond plain LoRA, peft's own implementations: LoRA's variants (`lora.use_dora`,
`lora.use_rslora`), `method: ia3` and `method: prefix`. SFT runs of the tiny Llama train what
each adds (DoRA's magnitudes, IA3's scaling vectors, the prefix's virtual tokens) and nothing
else, the adapter export declares it to plain peft, and the merged export computes what base +
adapter does (prefix tuning has nothing to merge: refused); a prefix-tuning run resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import (
    DATA,
    last_val_loss,
    losses,
    metrics_records,
    sft_spec,
    stop_with_ctrl_c,
    write_spec,
)


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


def prefix_spec(run_dir, model: str) -> dict:
    spec = sft_spec(run_dir, model, "prefix", steps=20, eval_every=5, lr=1e-1)
    spec["finetune"].pop("lora")
    spec["finetune"].update(seq_len=64, prefix={"num_virtual_tokens": 20})
    spec["cluster"]["procs_per_node"] = 2
    spec["checkpoint"]["every_steps"] = 5
    return spec


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory, tiny_llama):
    """An uninterrupted 2-rank prefix-tuning run (the resume test's reference)."""
    run = tmp_path_factory.mktemp("prefix") / "run"
    spec = prefix_spec(run, tiny_llama)
    r = run_cli("run", str(write_spec(run.parent / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return run, spec


def test_prefix_tuning_trains_only_its_virtual_tokens_and_scores_alike_on_any_rank_count(prefix_run):
    """Two ranks train the prefix; `hpctrain eval` of the export, one process batching the
    validation set otherwise, gives the run's last val_loss (a mean over response tokens, whatever
    the batches); merge is refused, and so are the inputs that bring a cache or masks of their own."""
    run, spec = prefix_run
    val = [x["val_loss"] for x in metrics_records(run) if "val_loss" in x]
    assert len(val) == 4 and val[-1] < val[0] - 0.05, val
    state = torch.load(run / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert list(state) == ["prompt_encoder.default.embedding.weight"]  # 20 tokens x 2 layers x (key, value)
    assert state["prompt_encoder.default.embedding.weight"].shape == (20, 2 * 2 * 64)
    export = run / "export"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    scored = run_cli("eval", str(run), "--data", str(DATA / "sft_valid.jsonl"))
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout.strip().splitlines()[-1])["val_loss"] == pytest.approx(val[-1], rel=1e-5)
    merged = run_cli("merge", str(run))
    assert merged.returncode == 2 and "cannot be merged" in merged.stderr, merged.stdout + merged.stderr

    for change, says in [({"finetune": {"merge": True}}, "finetune.merge: method prefix has nothing to fold"),
                         ({"finetune": {"packing": True}}, "finetune.packing with method prefix"),
                         ({"engine": {"type": "fsdp"}}, "prefix tuning) runs under engine.type: ddp"),
                         ({"finetune": {"kind": "classify", "train_file": str(DATA / "classify_train.csv"),
                                        "valid_file": str(DATA / "classify_valid.csv")}},
                          "is not offered for kind classify")]:
        bad = json.loads(json.dumps(spec))
        for section, fields in change.items():
            bad.setdefault(section, {}).update(fields)
        with pytest.raises(UserError) as e:
            spec_from_dict(bad, "s.yaml")
        assert says in str(e.value), str(e.value)


def test_a_prefix_tuning_run_stopped_with_ctrl_c_resumes_bitwise(tmp_path, prefix_run):
    """The virtual tokens and their optimizer state come back from the checkpoint: the steps
    after the stop are bitwise the uninterrupted run's, and so is its last evaluation."""
    ref, spec = prefix_run
    run = tmp_path / "run"
    path = write_spec(tmp_path / "s.yaml", {**spec, "run_dir": str(run)})
    stopped = stop_with_ctrl_c(path, run, 7)
    assert 5 <= stopped < 20
    r = run_cli("run", str(path), timeout=900)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(stopped + 1, 21)] == [want[s] for s in range(stopped + 1, 21)]
    assert last_val_loss(run) == last_val_loss(ref)
