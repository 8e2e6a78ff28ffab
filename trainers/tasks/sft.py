"""Supervised fine-tuning (`finetune.kind: sft`): prompt -> response, or chat messages whose last
message is the response. Labels are -100 on prompt tokens, so only the response carries loss;
examples longer than seq_len are truncated and counted; short ones may be packed together.
Validation reports the loss and its perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import SftSpec
from hpctrain.trainers.data.examples import Tokenized, field_value, pad_rows
from hpctrain.trainers.tasks import KindBase

# The plain template used when a tokenizer has no chat template (documented in docs/finetuning.md).
PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
ROLE_TEMPLATE = "### {role}:\n{content}\n"


class SFT(KindBase):
    """The sft kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "CAUSAL_LM"
    counts_size = 0  # validation needs the loss alone

    def __init__(self, ft: SftSpec) -> None:
        self.ft = ft

    def labels(self, records, path: str) -> None:  # noqa: ARG002 - no classification head
        return None

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Tokenized:  # noqa: ARG002
        return tokenize_sft(records, tok, self.ft, path)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return pack(tk, self.ft.seq_len) if self.ft.packing else tk

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([tk.input_ids[i] for i in idx], pad_id)
        labels = torch.full(ids.shape, -100, dtype=torch.long)
        for j, i in enumerate(idx):
            labels[j, : len(tk.labels[i])] = torch.tensor(tk.labels[i])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token loss on response tokens, logits)."""
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = module(input_ids=ids, attention_mask=mask).logits
        tgt = labels[:, 1:]
        if not (tgt != -100).any():
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=-100), logits

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return torch.zeros(0, dtype=torch.float64)

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        return {"val_ppl": math.exp(min(val_loss, 50))}


def tokenize_sft(records, tok, ft, path: str) -> Tokenized:
    ids_all, labels_all, cut = [], [], 0
    for line, rec in records:
        if ft.messages_field in rec:
            prompt_ids, response_ids = chat_ids(rec[ft.messages_field], tok, path, line, ft.messages_field)
        else:
            prompt = field_value(rec, ft.prompt_field, path, line, "finetune.prompt_field")
            response = field_value(rec, ft.response_field, path, line, "finetune.response_field")
            prompt_ids, response_ids = plain_ids(prompt, response, tok)
        ids = prompt_ids + response_ids
        labels = [-100] * len(prompt_ids) + response_ids
        if len(ids) > ft.seq_len:
            ids, labels, cut = ids[: ft.seq_len], labels[: ft.seq_len], cut + 1
        ids_all.append(ids)
        labels_all.append(labels)
    return Tokenized(ids_all, labels_all, cut)


def plain_ids(prompt, response, tok) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a plain-text pair: the prompt in `PROMPT_TEMPLATE`, the
    response followed by the end-of-sequence token (SFT's examples, DPO's pair sides)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return (tok(PROMPT_TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"],
            tok(str(response), add_special_tokens=False)["input_ids"] + eos)


def chat_ids(messages, tok, path: str, line: int, field: str,
             spec_field: str = "finetune.messages_field") -> tuple[list[int], list[int]]:
    """Prompt = every message but the last; response = the last (assistant) message (`field`:
    the record's field they came from; `spec_field`: the spec field that names it)."""
    if not isinstance(messages, list) or len(messages) < 2 or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise UserError(f"line {line}: '{field}' must be a list of >= 2 {{role, content}} messages",
                        file=path, field=spec_field)
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


def chat_prompt_ids(messages, tok, path: str, line: int, spec_field: str) -> list[int]:
    """The ids of chat `messages` with the assistant's turn opened (what GRPO samples after):
    the chat template's generation prompt, or the plain role template's."""
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise UserError(f"line {line}: a chat prompt must be a list of {{role, content}} messages",
                        file=path, field=spec_field)
    if getattr(tok, "chat_template", None):
        return list(_ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)))
    text = "".join(ROLE_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return tok(text + "### assistant:\n", add_special_tokens=False)["input_ids"]


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x


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
