"""Fine-tuning example handling: chat messages, plain template, truncation, packing, splits."""

from __future__ import annotations

import json

import pytest

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import KINDS, FinetuneBase
from hpctrain.trainers.data.examples import read_records, split_indices
from hpctrain.trainers.tasks.classify import label_names, tokenize_classify
from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE, ROLE_TEMPLATE, pack, tokenize_sft


@pytest.fixture(scope="module")
def tok(bpe_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer)


def _ft(**kw) -> FinetuneBase:
    kind = kw.pop("kind", "sft")
    return KINDS[kind](kind=kind, train_file="x.jsonl", **kw)


def test_chat_messages_without_a_template_use_the_plain_one(tok):
    msgs = [{"role": "user", "content": "Who writes the checkpoint?"}, {"role": "assistant", "content": "Rank 0."}]
    tk = tokenize_sft([(1, {"messages": msgs})], tok, _ft(), "f.jsonl")
    prompt = ROLE_TEMPLATE.format(role="user", content=msgs[0]["content"]) + "### assistant:\n"
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tk.labels[0][:n] == [-100] * n
    assert tok.decode(tk.input_ids[0][n:]) == "Rank 0.<|endoftext|>"


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tk = tokenize_sft([(1, {"messages": msgs})], tok, _ft(), "f.jsonl")
    n = len(tok("<user>hi<assistant>", add_special_tokens=False)["input_ids"])
    assert tk.labels[0][:n] == [-100] * n and tok.decode(tk.input_ids[0][n:]) == "hello"


def test_truncation_is_counted_and_packing_fills_sequences(tok):
    recs = [(i, {"prompt": "p " * 5, "response": "r " * (3 + i)}) for i in range(6)]
    tk = tokenize_sft(recs, tok, _ft(seq_len=14), "f.jsonl")
    assert tk.truncated == sum(len(x) >= 14 for x in tk.input_ids) and tk.truncated > 0
    assert all(len(x) <= 14 for x in tk.input_ids)
    short = tokenize_sft(recs[:4], tok, _ft(seq_len=200), "f.jsonl")
    packed = pack(short, 80)
    assert sum(map(len, packed.input_ids)) == sum(map(len, short.input_ids))
    assert len(packed.input_ids) < 4 and all(len(x) <= 80 for x in packed.input_ids)
    assert PROMPT_TEMPLATE.startswith("### Prompt:")


def test_labels_sorted_numbers_first_and_unknown_labels_refused(tok, tmp_path):
    recs = [(1, {"text": "a", "label": 10}), (2, {"text": "b", "label": 2}), (3, {"text": "c", "label": 2})]
    ft = _ft(kind="classify")
    assert label_names(recs, ft, "f") == ["2", "10"]
    with pytest.raises(UserError, match="unknown label '7'"):
        tokenize_classify([(4, {"text": "d", "label": 7})], tok, ft, {"2": 0, "10": 1}, "f.jsonl")
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n[1, 2]\n")
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_records(str(p))


def test_seeded_split_is_stable_and_never_empty():
    a, b = split_indices(100, 0.2, seed=3), split_indices(100, 0.2, seed=3)
    assert a == b and 5 < len(a[1]) < 40 and sorted(a[0] + a[1]) == list(range(100))
    assert len(split_indices(3, 0.01, seed=1)[1]) == 1
