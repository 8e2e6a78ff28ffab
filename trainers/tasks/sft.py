"""Supervised fine-tuning (`finetune.kind: sft`): prompt -> response, or chat messages whose last
message is the response. Labels are -100 on prompt tokens, so only the response carries loss;
examples longer than seq_len are truncated and counted; short ones may be packed together.
Validation reports the loss and its perplexity; with `generation_metrics`, also a response
generated to every validation prompt (trainers/tasks/generated.py), scored against the example's
response (BLEU, chrF, ROUGE-L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import SftSpec
from hpctrain.trainers.data.examples import Tokenized, field_value, pad_rows
from hpctrain.trainers.tasks.generated import GeneratingKind, Generation

# The plain template used when a tokenizer has no chat template (documented in docs/finetuning.md).
PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
ROLE_TEMPLATE = "### {role}:\n{content}\n"


class SFT(GeneratingKind):
    """The sft kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, ft: SftSpec) -> None:
        self.ft = ft
        self.gen = Generation(ft)
        self.counts_size = self.gen.size  # the loss alone unless generation is scored
        self.tok, self.pad = None, 0

    def labels(self, records, path: str) -> None:  # noqa: ARG002 - no classification head
        return None

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Tokenized:  # noqa: ARG002
        self.tok = tok
        return tokenize_sft(records, tok, self.ft, path)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return pack(tk, self.ft.seq_len) if self.ft.packing else tk

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([tk.input_ids[i] for i in idx], pad_id)
        labels = torch.full(ids.shape, -100, dtype=torch.long)
        for j, i in enumerate(idx):
            labels[j, : len(tk.labels[i])] = torch.tensor(tk.labels[i])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if tk.references is not None and self.gen.size:  # what generation starts from and is scored against
            self.pad = pad_id
            batch["prompts"] = [tk.input_ids[i][: _prompt_length(tk.labels[i])] for i in idx]
            batch["references"] = [tk.references[i] for i in idx]
        return batch

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token loss on response tokens, logits)."""
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = module(input_ids=ids, attention_mask=mask).logits
        tgt = labels[:, 1:]
        if not (tgt != -100).any():
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=-100), logits

    def loss_weight(self, batch: dict, examples: int) -> int:  # noqa: ARG002 - a mean over response tokens
        return int((batch["labels"][:, 1:] != -100).sum())

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return torch.zeros(0, dtype=torch.float64)

    def eval_counts(self, module, batch: dict, logits: torch.Tensor, device) -> torch.Tensor:  # noqa: ARG002
        """With generation_metrics: a response generated to each prompt (left-padded), scored."""
        if not self.gen.size:
            return torch.zeros(0, dtype=torch.float64)
        prompts = batch["prompts"]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p) :] = 1
        out = self.gen.generate(module, ids.to(device), mask.to(device), pad_token_id=self.pad,
                                eos_token_id=self.tok.eos_token_id)
        hyps = [s.strip() for s in self.tok.batch_decode(out[:, width:], skip_special_tokens=True)]
        shown = [s.strip() for s in self.tok.batch_decode(prompts, skip_special_tokens=True)]
        return self.gen.score(shown, hyps, batch["references"], "prompt")

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:
        return {"val_ppl": math.exp(min(val_loss, 50)), **self.gen.metrics(counts)}


def tokenize_sft(records, tok, ft, path: str) -> Tokenized:
    ids_all, labels_all, refs, cut = [], [], [], 0
    for line, rec in records:
        if ft.messages_field in rec:
            prompt_ids, response_ids = chat_ids(rec[ft.messages_field], tok, path, line, ft.messages_field)
            refs.append(str(rec[ft.messages_field][-1]["content"]))
        else:
            prompt = field_value(rec, ft.prompt_field, path, line, "finetune.prompt_field")
            response = field_value(rec, ft.response_field, path, line, "finetune.response_field")
            prompt_ids, response_ids = plain_ids(prompt, response, tok)
            refs.append(str(response))
        ids = prompt_ids + response_ids
        labels = [-100] * len(prompt_ids) + response_ids
        if len(ids) > ft.seq_len:
            ids, labels, cut = ids[: ft.seq_len], labels[: ft.seq_len], cut + 1
        ids_all.append(ids)
        labels_all.append(labels)
    return Tokenized(ids_all, labels_all, cut, references=refs)


def _prompt_length(labels: list[int]) -> int:
    """The prompt's tokens: those before the first labelled (response) token."""
    return next((k for k, x in enumerate(labels) if x != -100), len(labels))


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
