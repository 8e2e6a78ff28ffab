"""`method: freeze` (training only the top layers, or the parameters named by regex): SFT of the
tiny Llama on 2 real torchrun ranks under DDP, FSDP2 and ZeRO-3 leaves every frozen tensor of the whole
exported model bitwise the base's while each trained one moves; `validate` reports what it
trains and refuses what cannot be trained before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.trainers.helpers import sft_spec, write_spec


def freeze_spec(run_dir, base: str, **freeze) -> dict:
    spec = sft_spec(run_dir, base, "freeze", steps=4, eval_every=4)
    spec["finetune"].pop("lora")
    spec["finetune"]["seq_len"] = 64
    spec["finetune"]["freeze"] = freeze
    spec["cluster"]["procs_per_node"] = 2
    spec["checkpoint"]["every_steps"] = 4
    return spec


def weights(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("engine", [{"type": "ddp"}, {"type": "fsdp"},
                                    pytest.param({"type": "deepspeed", "zero_stage": 3}, marks=pytest.mark.deepspeed)],
                         ids=["ddp", "fsdp", "zero3"])
def test_only_the_top_block_and_named_parameters_move(tmp_path, tiny_llama, engine):
    spec = freeze_spec(tmp_path / "run", tiny_llama, trainable_layers=1, trainable_modules=[r"^model\.norm\."])
    spec["engine"] = engine
    r = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "freeze: trains the top 1 of 2 blocks, '^model\\\\.norm\\\\.' (1 tensors); the rest frozen" in r.stdout
    base, after = weights(tiny_llama), weights(tmp_path / "run" / "export")
    assert set(after) == set(base)  # the whole model
    trained = {n for n in base if n.startswith(("model.layers.1.", "model.norm."))}
    assert len(trained) > 5
    for name, tensor in base.items():
        if name in trained:
            assert not after[name].equal(tensor), f"{name} was to be trained and did not move"
        else:
            assert after[name].equal(tensor), f"{name} was frozen and moved"


def test_validate_reports_what_freeze_trains_and_refuses_what_it_cannot(tmp_path, tiny_llama):
    spec = freeze_spec(tmp_path / "run", tiny_llama, trainable_layers=-1)
    r = run_cli("validate", str(write_spec(tmp_path / "ok.yaml", spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    said = re.search(r"finetune\.freeze: ([\d,]+) of ([\d,]+) parameters trained", r.stdout)
    assert said, r.stdout
    trained, total = (int(x.replace(",", "")) for x in said.groups())
    assert 0 < trained < total / 2  # the bottom block of two, without embeddings or head
    plan = run_cli("plan", str(tmp_path / "ok.yaml"))
    assert plan.returncode == 0 and f"model: {total:,} parameters, {trained:,} trainable" in plan.stdout, plan.stdout
    cases = [
        ({"trainable_layers": 3}, "finetune.freeze.trainable_layers: trainable_layers 3 is past the model's 2 "
                                  "transformer blocks"),
        ({"trainable_modules": ["norm", "no_such_module"]},
         "finetune.freeze.trainable_modules.1: trainable_modules 'no_such_module' matches no parameter"),
        ({"trainable_modules": ["(unclosed"]}, "finetune.freeze.trainable_modules.0: '(unclosed' is not a regular"),
        ({}, "method freeze trains what finetune.freeze names"),
        ({"trainable_layers": 0}, "finetune.freeze.trainable_layers is 0"),
    ]
    for i, (freeze, message) in enumerate(cases):
        bad = freeze_spec(tmp_path / f"run{i}", tiny_llama, **freeze)
        r = run_cli("validate", str(write_spec(tmp_path / f"s{i}.yaml", bad)))
        assert r.returncode == 2 and message in r.stderr, (freeze, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / f"run{i}").exists()
    lora = sft_spec(tmp_path / "lora", tiny_llama, "lora")
    lora["finetune"]["freeze"] = {"trainable_layers": 1}
    r = run_cli("validate", str(write_spec(tmp_path / "lora.yaml", lora)))
    assert r.returncode == 2 and "finetune.freeze is for method freeze (this spec's method is lora)" in r.stderr
