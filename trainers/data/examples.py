"""Fine-tuning examples: SFT (prompt -> response, or chat messages) and classification.

Records come from JSONL (any task) or CSV (classification). Every problem names
the file, the line and the field. SFT labels are -100 on prompt tokens, so only
the response carries loss; examples longer than seq_len are truncated and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.records import iter_records
from hpctrain.launcher.contract.split import split_indices  # noqa: F401 - re-exported for the trainers

# The plain template used when a tokenizer has no chat template (documented in docs/finetuning.md).
PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
ROLE_TEMPLATE = "### {role}:\n{content}\n"


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, record) from a JSONL or CSV file; at least one record."""
    out = list(iter_records(path))
    if not out:
        raise UserError("no examples", file=path, expected="at least one record")
    return out


def _field(rec: dict, name: str, path: str, line: int, spec_field: str):
    if name not in rec or rec[name] is None or rec[name] == "":
        raise UserError(f"line {line} has no field '{name}' (has {sorted(rec)})", file=path,
                        field=spec_field, expected=f"'{name}' in every record")
    return rec[name]


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list  # per-token label lists (sft) or class ids (classify)
    truncated: int


def tokenize_sft(records, tok, ft, path: str) -> Tokenized:
    eos = tok.eos_token_id
    ids_all, labels_all, cut = [], [], 0
    for line, rec in records:
        if ft.messages_field in rec:
            prompt_ids, response_ids = _chat(rec[ft.messages_field], tok, path, line, ft.messages_field)
        else:
            prompt = _field(rec, ft.prompt_field, path, line, "finetune.prompt_field")
            response = _field(rec, ft.response_field, path, line, "finetune.response_field")
            prompt_ids = tok(PROMPT_TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]
            response_ids = tok(str(response), add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = prompt_ids + response_ids
        labels = [-100] * len(prompt_ids) + response_ids
        if len(ids) > ft.seq_len:
            ids, labels, cut = ids[: ft.seq_len], labels[: ft.seq_len], cut + 1
        ids_all.append(ids)
        labels_all.append(labels)
    return Tokenized(ids_all, labels_all, cut)


def _chat(messages, tok, path: str, line: int, field: str) -> tuple[list[int], list[int]]:
    """Prompt = every message but the last; response = the last (assistant) message."""
    if not isinstance(messages, list) or len(messages) < 2 or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise UserError(f"line {line}: '{field}' must be a list of >= 2 {{role, content}} messages",
                        file=path, field="finetune.messages_field")
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(messages, tokenize=True)
        prompt, full = list(_ids(prompt)), list(_ids(full))
        if full[: len(prompt)] == prompt:
            return prompt, full[len(prompt) :]
    text = "".join(ROLE_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages[:-1])
    text += f"### {messages[-1]['role']}:\n"
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return prompt, tok(str(messages[-1]["content"]), add_special_tokens=False)["input_ids"] + eos


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x


def label_names(records, ft, path: str) -> list[str]:
    if ft.labels is not None:
        return list(ft.labels)
    names = {str(_field(rec, ft.label_field, path, line, "finetune.label_field")) for line, rec in records}
    return sorted(names, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))


def tokenize_classify(records, tok, ft, label2id: dict[str, int], path: str) -> Tokenized:
    ids_all, labels, cut = [], [], 0
    for line, rec in records:
        text = str(_field(rec, ft.text_field, path, line, "finetune.text_field"))
        label = str(_field(rec, ft.label_field, path, line, "finetune.label_field"))
        if label not in label2id:
            raise UserError(f"line {line}: unknown label '{label}'", file=path, field="finetune.label_field",
                            expected=f"one of {sorted(label2id)}")
        ids = tok(text, truncation=False)["input_ids"]
        if len(ids) > ft.seq_len:
            ids, cut = ids[: ft.seq_len], cut + 1
        ids_all.append(ids)
        labels.append(label2id[label])
    return Tokenized(ids_all, labels, cut)


def pack(tk: Tokenized, seq_len: int) -> Tokenized:
    """Greedy packing of short SFT examples, in order, into sequences of <= seq_len tokens."""
    ids_out, lab_out = [[]], [[]]
    for ids, lab in zip(tk.input_ids, tk.labels, strict=True):
        if ids_out[-1] and len(ids_out[-1]) + len(ids) > seq_len:
            ids_out.append([])
            lab_out.append([])
        ids_out[-1] += ids
        lab_out[-1] += lab
    return Tokenized(ids_out, lab_out, tk.truncated)


class ExampleDataset:
    """Tokenized examples; `__getitems__` pads one micro-batch to its longest example."""

    def __init__(self, tk: Tokenized, pad_id: int, kind: str) -> None:
        self.tk, self.pad_id, self.kind = tk, pad_id, kind

    def __len__(self) -> int:
        return len(self.tk.input_ids)

    def __getitems__(self, keys) -> dict[str, torch.Tensor]:
        idx = [k[1] for k in keys]
        return self.batch(idx)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.tk.input_ids[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "sft":
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                labels[j, : len(self.tk.labels[i])] = torch.tensor(self.tk.labels[i])
            out["labels"] = labels
        else:
            out["labels"] = torch.tensor([self.tk.labels[i] for i in idx], dtype=torch.long)
        return out
