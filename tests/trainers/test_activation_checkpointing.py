"""`training.activation_checkpointing`: which blocks are recomputed, that the losses do not change
(DDP and ZeRO-3 runs beside their references live in test_deepspeed.py), and plan's estimate."""

from __future__ import annotations

import pytest
import torch

from hpctrain.launcher.contract.model_size import ModelSize
from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.launcher.plan import activation_bytes
from hpctrain.trainers.model import build_model, transformer_blocks
from tests.trainers.helpers import TINY_LLAMA


def _spec(mode: str, every: int = 2) -> dict:
    config = {**TINY_LLAMA, "num_hidden_layers": 4}
    return spec_from_dict({"name": "t", "run_dir": "/tmp/unused", "model": {"config": config, "tokenizer": "/tmp/unused"},
                           "data": {"corpora": [{"path": "/tmp/unused"}], "seq_len": 16},
                           "training": {"global_batch": 2, "micro_batch": 2, "steps": 1,
                                        "activation_checkpointing": mode,
                                        "activation_checkpointing_every": every}})


def _forward_calls(mode: str, every: int = 2) -> tuple[list[int], torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(_spec(mode, every)).model
    calls = [0] * len(transformer_blocks(model))
    for i, block in enumerate(transformer_blocks(model)):  # its MLP runs again when it is recomputed
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return calls, grad


@pytest.mark.parametrize(("mode", "every", "expected"), [
    ("none", 2, [1, 1, 1, 1]), ("full", 2, [2, 2, 2, 2]), ("selective", 2, [2, 1, 2, 1]),
    ("selective", 3, [2, 1, 1, 2]),
])
def test_the_chosen_blocks_run_again_in_the_backward_with_the_same_gradients(mode, every, expected):
    calls, grad = _forward_calls(mode, every)
    assert calls == expected
    _, plain = _forward_calls("none")
    assert torch.equal(grad, plain)


def test_plan_counts_what_checkpointing_keeps():
    m = ModelSize(total=0, trainable=0, quantized=0, largest_layer=0, hidden=4096, layers=32, vocab=32000)
    none, sel, full = (activation_bytes(_spec(mode, 4), m) for mode in ("none", "selective", "full"))
    logits = 16 * 2 * 32000 * 12
    assert full < sel < none
    per_layer = 34 * 16 * 2 * 4096 * 2  # fp32
    assert none - logits == pytest.approx(32 * per_layer)
    assert full - logits == pytest.approx(32 * per_layer * 2 / 34 + per_layer)  # inputs + one block
