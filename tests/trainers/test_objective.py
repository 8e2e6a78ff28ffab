"""The pretraining objective's output layer: MLM on masked positions only, CLM loss in chunks
(in-process, tiny models: the same loss and gradients as the plain computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.trainers import objective as objective_module
from hpctrain.trainers.objective import FusedLinearCrossEntropy, Objective


def _spec(kind: str) -> object:
    return spec_from_dict({"name": "t", "run_dir": "/tmp/unused", "objective": {"type": kind},
                           "model": {"config": {"model_type": "llama"}, "tokenizer": "/unused"},
                           "data": {"corpora": [{"path": "/unused"}], "seq_len": 16},
                           "training": {"global_batch": 2, "micro_batch": 2, "steps": 1}})


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy_matches_the_plain_loss_and_gradients(bias):
    torch.manual_seed(0)
    h = torch.randn(50, 8, requires_grad=True)
    head = torch.nn.Linear(8, 33, bias=bias)
    t = torch.randint(0, 33, (50,))
    plain = F.cross_entropy(head(h), t)
    want = torch.autograd.grad(plain * 0.25, [h, *head.parameters()])
    fused = FusedLinearCrossEntropy.apply(h, head.weight, head.bias, t, 7, True)  # 8 chunks, the last short
    got = torch.autograd.grad(fused * 0.25, [h, *head.parameters()])
    assert torch.allclose(fused, plain, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-6)


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def test_clm_in_chunks_gives_the_whole_logits_loss_and_gradients(monkeypatch):
    tokens = torch.randint(0, 97, (2, 17))
    whole, chunked = _tiny_llama(), _tiny_llama()
    keys = list(chunked.state_dict())
    objective = Objective(_spec("clm"), None, 97)
    objective.attach(chunked)
    monkeypatch.setattr(objective_module, "CHUNK_LOGITS", 97 * 5)  # 5 rows a chunk: 32 tokens, 7 chunks
    ref = Objective(_spec("clm"), None, 97)(whole, {"tokens": tokens}, torch.device("cpu"))
    got = objective(chunked, {"tokens": tokens}, torch.device("cpu"))
    ref.backward()
    got.backward()
    assert torch.allclose(got, ref, atol=1e-5)
    for (name, a), b in zip(chunked.named_parameters(), whole.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    with torch.no_grad():  # evaluation: the same loss, without the gradients' matmuls
        assert objective(chunked, {"tokens": tokens}, torch.device("cpu")) == got.detach()
    # evaluation, generation and export still see logits; the checkpoint's keys are unchanged
    assert chunked(input_ids=tokens).logits.shape == (2, 17, 97)
    assert list(chunked.state_dict()) == keys


class _Tok:
    mask_token_id = 3
    all_special_ids = [0, 1, 2, 3]


def test_mlm_projects_only_the_masked_positions():
    from transformers import AutoConfig, AutoModelForMaskedLM

    def bert():
        torch.manual_seed(0)
        return AutoModelForMaskedLM.from_config(AutoConfig.for_model(
            "bert", vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    batch = {"tokens": torch.randint(4, 97, (4, 17)), "positions": torch.arange(4)}
    whole, masked = bert(), bert()
    objective = Objective(_spec("mlm"), _Tok(), 97)
    objective.attach(masked)
    rows = []
    masked.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape))
    got = objective(masked, batch, torch.device("cpu"))
    inputs, labels = objective.mask(batch["tokens"][:, :-1], batch["positions"])
    logits = whole(input_ids=inputs).logits
    ref = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    assert rows == [(int((labels != -100).sum()), 97)] and 0 < rows[0][0] < 4 * 16
    assert torch.allclose(got, ref, atol=1e-5)
    got.backward()
    ref.backward()
    for (name, a), b in zip(masked.named_parameters(), whole.parameters(), strict=True):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
