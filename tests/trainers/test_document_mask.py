"""`data.document_mask`: a packed sample's loss is that of its documents, each computed alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.spec import spec_from_dict
from hpctrain.trainers import objective as objective_module
from hpctrain.trainers.objective import Objective
from tests.conftest import run_cli
from tests.trainers.helpers import TINY_LLAMA, clm_spec, losses, stop_with_ctrl_c, write_spec

STARTS = [0, 7, 20]  # documents of 7, 13 and 13 tokens in a sample of 33 (32 inputs + the last target)
N = 32


def _spec(kind: str, document_mask: bool):
    s = clm_spec("/tmp/unused", "unused", "unused", data__document_mask=document_mask)
    s["objective"] = {"type": kind, "mask_prob": 0.3}
    return spec_from_dict(s)


def _llama(attention: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                            attn_implementation=attention).eval()


def _bert(attention: str, vocab: int):
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=64)
    return AutoModelForMaskedLM.from_config(cfg, attn_implementation=attention).eval()


def _segments(n: int):
    bounds = [*STARTS, n]
    return list(zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain-loss", "chunked-loss"])
def test_a_packed_clm_sample_scores_as_its_documents_alone(attention, chunked, monkeypatch):
    """Token-weighted mean of each document's own next-token loss (targets inside it only),
    through transformers' mask from restarting position ids; also through the chunked loss."""
    if chunked:  # rows of 8: the output layer takes the loss itself, in 4 chunks
        monkeypatch.setattr(objective_module, "CHUNK_LOGITS", 8 * TINY_LLAMA["vocab_size"])
    model = _llama(attention)
    torch.manual_seed(1)
    tokens = torch.randint(TINY_LLAMA["vocab_size"], (1, N + 1))
    batch = {"tokens": tokens, "positions": torch.tensor([0]), "doc_starts": [torch.tensor(STARTS)]}
    obj = Objective(_spec("clm", True), None, TINY_LLAMA["vocab_size"])
    obj.attach(model)
    packed = obj(model, batch, torch.device("cpu"))

    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in _segments(N + 1):
            doc = tokens[:, a:b]
            logits = model(input_ids=doc[:, :-1]).logits
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), doc[0, 1:], reduction="sum"))
            count += b - a - 1
    assert abs(float(packed.detach()) - total / count) < 1e-5

    plain = Objective(_spec("clm", False), None, TINY_LLAMA["vocab_size"])
    assert abs(float(plain(model, batch, torch.device("cpu"))) - total / count) > 1e-3  # the mask matters


def test_the_chunked_loss_gives_the_plain_gradients_with_ignored_targets(monkeypatch):
    """The output layer's own loss in chunks skips the targets across boundaries exactly as
    F.cross_entropy's ignore_index does, in the loss and in every gradient."""
    tokens = torch.randint(TINY_LLAMA["vocab_size"], (2, N + 1), generator=torch.Generator().manual_seed(2))
    batch = {"tokens": tokens, "positions": torch.tensor([0, 1]),
             "doc_starts": [torch.tensor(STARTS), torch.tensor([3, 30, 33])]}
    grads = []
    for rows in (None, 5):
        if rows:
            monkeypatch.setattr(objective_module, "CHUNK_LOGITS", rows * TINY_LLAMA["vocab_size"])
        model = _llama("sdpa").train()
        obj = Objective(_spec("clm", True), None, TINY_LLAMA["vocab_size"])
        obj.attach(model)
        loss = obj(model, batch, torch.device("cpu"))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain), (chunked_loss, chunked) = grads
    assert abs(plain_loss - chunked_loss) < 1e-6
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_mlm_sample_scores_as_its_documents_alone(attention, minilm_path):
    """Every token attends within its own document, positions restart: the masked-token loss
    of the packed sample is the token-weighted mean of each document's, computed alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = _bert(attention, len(tok))
    torch.manual_seed(3)
    tokens = torch.randint(1000, len(tok), (1, N + 1))
    batch = {"tokens": tokens, "positions": torch.tensor([5]), "doc_starts": [torch.tensor(STARTS)]}
    obj = Objective(_spec("mlm", True), tok, len(tok))
    obj.attach(model)
    packed = obj(model, batch, torch.device("cpu"))

    inputs, labels = obj.mask(tokens[:, :-1], batch["positions"])  # the same masks, seeded per position
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in _segments(N):
            keep = labels[0, a:b] != -100
            if not keep.any():
                continue
            obj.keep = keep[None]
            try:
                logits = model(input_ids=inputs[:, a:b]).logits
            finally:
                obj.keep = None
            total += float(F.cross_entropy(logits, labels[0, a:b][keep], reduction="sum"))
            count += int(keep.sum())
    assert count > 3
    assert abs(float(packed.detach()) - total / count) < 1e-5
    plain = Objective(_spec("mlm", False), tok, len(tok))
    plain.keep = None
    assert abs(float(plain(model, {k: batch[k] for k in ("tokens", "positions")}, torch.device("cpu")))
               - total / count) > 1e-3


@pytest.mark.multiproc
def test_a_document_masked_run_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    """Through the trainer (2 ranks, validation with the same mask): Ctrl-C, then the same command."""
    def spec(name):
        return clm_spec(tmp_path / name, bpe_tokenizer, bpe_corpus, data__document_mask=True,
                        training__steps=12, training__eval_every=6, checkpoint__every_steps=4)

    ref = tmp_path / "ref"
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", spec("ref"))), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = losses(ref)
    assert len(want) == 12 and all(v == v for v in want.values())

    path = write_spec(tmp_path / "cut.yaml", spec("cut"))
    stopped = stop_with_ctrl_c(path, tmp_path / "cut", at_step=5)
    r = run_cli("run", str(path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout
    got = losses(tmp_path / "cut")
    assert [got[s] for s in range(stopped + 1, 13)] == [want[s] for s in range(stopped + 1, 13)]
