"""QLoRA's base layers on both of bitsandbytes' CPU paths, wherever the suite runs.

bitsandbytes repacks a 4-bit weight for its inference kernel on a CPU with AVX-512 BF16 when a
layer runs in eval mode on an input without gradient; elsewhere it keeps the weight as it is.
Each test forces one path, so a machine of either kind checks both."""

from __future__ import annotations

import pytest
import torch

from hpctrain.trainers.model import keep_4bit_layout

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra 'qlora')")


class _Base(torch.nn.Module):
    """Two frozen 4-bit layers and a trainable one below them: its gradient passes through both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.low = torch.nn.Linear(64, 64)
        self.q = torch.nn.ModuleList()
        for _ in range(2):
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4")
            layer.weight = layer.weight._quantize("cpu")  # as from_pretrained leaves it
            self.q.append(layer)

    def forward(self, x):
        h = self.low(x)
        for layer in self.q:
            h = torch.relu(layer(h))
        return h.sum()


def _grad_after(model, x, evaluate: bool):
    if evaluate:  # the trainer's validation pass
        model.eval()
        with torch.no_grad():
            model(x)
    model.train()
    model.zero_grad()
    model(x).backward()
    return model.low.weight.grad


@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["avx512bf16-path", "plain-path"])
def test_training_after_an_evaluation_computes_the_same_gradients(avx512_bf16):
    x = torch.randn(8, 64)
    ref = _grad_after(_Base(), x, evaluate=False).clone()
    model = _Base()
    for layer in model.q:
        layer.support_avx512bf16_for_cpu = avx512_bf16  # what bitsandbytes detected on this CPU
    keep_4bit_layout(model)
    got = _grad_after(model, x, evaluate=True)
    assert got is not None and torch.equal(got, ref)
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.q)
