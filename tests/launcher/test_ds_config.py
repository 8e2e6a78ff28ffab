"""The DeepSpeed config: templates filled from the spec, one source of truth, conflicts refused."""

from __future__ import annotations

import json

import pytest

from hpctrain.launcher.contract.ds_config import build_ds_config
from hpctrain.launcher.contract.errors import UserErrors
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, write_spec


def _spec(tmp_path, engine: dict, **training):
    s = clm_spec(tmp_path / "run", "tok", "corpus")
    s["engine"] = engine
    s["training"].update(training)
    return spec_from_dict(s)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_templates_are_filled_from_the_spec(tmp_path, stage):
    spec = _spec(tmp_path, {"type": "deepspeed", "zero_stage": stage}, precision="bf16", grad_clip=0.5)
    cfg = build_ds_config(spec, world_size=2)
    assert cfg["zero_optimization"]["stage"] == stage
    # global 8 = micro 2 x accumulation 2 x 2 ranks: DeepSpeed's own assertion holds
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 2, 2)
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    # every "auto" is filled, but bucket sizes: the trainer caps them at the model's size
    zo = {k: v for k, v in cfg["zero_optimization"].items() if not k.endswith("bucket_size")}
    assert "auto" not in json.dumps({**cfg, "zero_optimization": zo})
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours, handed over as objects


def test_offload_picks_the_offload_template(tmp_path):
    cfg = build_ds_config(_spec(tmp_path, {"type": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                                           "offload_params": "cpu"}), world_size=1)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    cfg = build_ds_config(_spec(tmp_path, {"type": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu"}), 1)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "offload_param" not in cfg["zero_optimization"]


def test_user_json_values_the_spec_owns_must_agree(tmp_path):
    user = tmp_path / "my ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4,
                                "gradient_clipping": "auto", "optimizer": {"type": "Adam"}}))
    spec = _spec(tmp_path, {"type": "deepspeed", "config": str(user)})
    with pytest.raises(UserErrors) as e:
        build_ds_config(spec, world_size=2)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu is 4" in msg and "2 from the spec (training.micro_batch)" in msg
    assert "'optimizer' is set in the DeepSpeed JSON" in msg
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True},
                                "train_micro_batch_size_per_gpu": 2}))
    cfg = build_ds_config(spec, world_size=2)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True} and cfg["gradient_accumulation_steps"] == 2


def test_engine_fields_are_checked_in_the_spec(tmp_path, bpe_tokenizer, bpe_corpus):
    s = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    s["engine"] = {"type": "ddp", "zero_stage": 2}
    r = run_cli("validate", str(write_spec(tmp_path / "a.yaml", s)))
    assert r.returncode == 2 and "engine.zero_stage needs engine.type: deepspeed" in r.stderr
    s["engine"] = {"type": "deepspeed", "zero_stage": 2, "offload_params": "cpu"}
    r = run_cli("validate", str(write_spec(tmp_path / "b.yaml", s)))
    assert r.returncode == 2 and "offload_params needs engine.zero_stage: 3" in r.stderr
    assert "Traceback" not in r.stderr
    s["engine"] = {"type": "fsdp", "zero_stage": 3}  # a DeepSpeed spec switched to fsdp: what to do
    r = run_cli("validate", str(write_spec(tmp_path / "fsdp.yaml", s)))
    assert r.returncode == 2 and "engine.zero_stage needs engine.type: deepspeed" in r.stderr
    assert "offload_params: cpu; drop the DeepSpeed fields" in r.stderr and "Traceback" not in r.stderr
    s["engine"] = {"type": "deepspeed", "zero_stage": 1, "offload_optimizer": "cpu"}
    r = run_cli("validate", str(write_spec(tmp_path / "c.yaml", s)))
    assert r.returncode == 2 and "offload_optimizer needs engine.zero_stage: 2 or 3" in r.stderr
    s["engine"] = {"type": "deepspeed", "zero_stage": 4}
    r = run_cli("validate", str(write_spec(tmp_path / "d.yaml", s)))
    assert r.returncode == 2 and "engine.zero_stage" in r.stderr and "1, 2 or 3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_deepspeed_not_installed_is_a_clear_error(tmp_path, bpe_tokenizer, bpe_corpus):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["deepspeed"] = None  # as if not installed\n')
    s = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    s["engine"] = {"type": "deepspeed", "zero_stage": 2}
    spec = write_spec(tmp_path / "s.yaml", s)
    for cmd in ("validate", "run"):
        r = run_cli(cmd, str(spec), env={"PYTHONPATH": str(hide)})
        assert r.returncode == 2 and "DeepSpeed is not installed" in r.stderr and "engine.type" in r.stderr, r.stderr
        assert "tools/setup.sh" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_validate_refuses_a_conflicting_user_json(tmp_path, bpe_tokenizer, bpe_corpus):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0}))
    s = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus)
    s["engine"] = {"type": "deepspeed", "config": str(user)}
    r = run_cli("validate", str(write_spec(tmp_path / "s.yaml", s)))
    assert r.returncode == 2 and "engine.config" in r.stderr
    assert "gradient_clipping is 5.0" in r.stderr and "(training.grad_clip)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_zero3_gathers_a_couple_of_blocks_or_the_embedding_at_once():
    """ZeRO-3's "auto" limits on what is gathered at once: two transformer blocks (24·h²), or
    the largest parameter where that is more, never more than a rank's share; a value the
    user's config sets is kept. (DeepSpeed's default, 1e9, keeps most models whole.)"""
    from hpctrain.trainers.engines.deepspeed import fill_bucket_sizes

    def live(n, h, world, largest, zo=None):
        cfg = fill_bucket_sizes({"zero_optimization": {"stage": 3, **(zo or {})}}, n, h, world, largest)
        return cfg["zero_optimization"]["stage3_max_live_parameters"], cfg["zero_optimization"]["stage3_max_reuse_distance"]

    # a 277M Llama with its own 32,000 x 1,024 output head: the head, not half the model
    assert live(277_253_120, 1024, 2, 32000 * 1024) == (32000 * 1024,) * 2
    # a 7B model: two blocks of 4,096 (402M elements), not 1e9 nor half of 6.7B
    assert live(6_738_415_616, 4096, 2, 32000 * 4096) == (24 * 4096 * 4096,) * 2
    # a tiny model on 2 ranks: at most a rank's share
    assert live(40_000, 32, 2, 600 * 32) == (20_000,) * 2
    assert live(277_253_120, 1024, 2, 0, {"stage3_max_live_parameters": 123})[0] == 123
