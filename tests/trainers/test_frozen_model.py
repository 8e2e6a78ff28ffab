"""An engine holds a second, frozen model (a DPO reference, a reward model) the way it holds the
one it trains: a frozen copy of the policy gives the policy's outputs at step 0 and stays put
while the policy trains, under DDP, ZeRO-3 and FSDP2 (2 real torchrun ranks, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.trainers.helpers import TINY_LLAMA, clm_spec, write_spec


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    """A tiny Llama's weights in a folder (model.path): both copies load the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
                                     ).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("engine", [
    {"type": "ddp"},
    pytest.param({"type": "deepspeed", "zero_stage": 3}, marks=pytest.mark.deepspeed),
    {"type": "fsdp"},
], ids=["ddp", "zero3", "fsdp"])
def test_a_frozen_copy_answers_like_the_policy_and_stays_frozen(tmp_path, saved_llama, bpe_tokenizer, bpe_corpus,
                                                                engine):
    spec = clm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, engine=engine,
                    training__global_batch=4)  # one micro-batch of 2 per rank: a step is one micro-step
    spec["model"] = {"path": saved_llama, "tokenizer": bpe_tokenizer}
    out = tmp_path / "seen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(REPO / "tests" / "trainers" / "frozen_probe.py"), str(write_spec(tmp_path / "s.yaml", spec)),
                        str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["equal_at_step_0"], seen
    assert seen["policy_moved"] and seen["reference_unchanged"], seen
    assert seen["reference_trainable"] == 0 and not seen["reference_training_mode"], seen
    # held like the policy: whole under DDP, about half of it on each of 2 ranks when sharded
    assert seen["reference_share"] == pytest.approx(seen["policy_share"]), seen
    assert (seen["reference_share"] == 1.0) == (engine["type"] == "ddp"), seen
