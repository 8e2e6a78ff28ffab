"""Sequence to sequence (`finetune.kind: seq2seq`): an encoder-decoder model (Marian, T5, BART,
mBART) learns source -> target. The encoder reads the source, the decoder is trained on the
target shifted right (the model's own `decoder_start_token_id` first), the loss is on target
tokens only. Sources and targets longer than source_len / target_len are truncated (their end
of sequence kept) and counted.

Validation reports the teacher-forced loss, then generates every validation source (HF
`generate`: `generation.num_beams`, `generation.max_new_tokens`) and scores the outputs against
the references with `finetune.metrics` (trainers/tasks/scores.py: BLEU, chrF, ROUGE-L, from
statistics summed over micro-batches and ranks: the corpus scores of the whole set). The model
generates from the engine's `sampling()`: under ZeRO-3 its weights gathered once; under FSDP2
the sharded model, every rank running as many forwards (HF's `synced_gpus`). The first
`predictions_logged` outputs go beside their sources and references to
predictions/step_N.jsonl and the W&B table `predictions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.finetune import Seq2SeqSpec
from hpctrain.trainers.data.examples import Tokenized, field_value, pad_rows
from hpctrain.trainers.tasks.generated import GeneratingKind, Generation


class Seq2Seq(GeneratingKind):
    """The seq2seq kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "SEQ_2_SEQ_LM"

    def __init__(self, ft: Seq2SeqSpec) -> None:
        self.ft = ft
        self.gen = Generation(ft)
        self.counts_size = self.gen.size
        self.tok = None
        self.decoder_ids: tuple[int, int] | None = None

    # -- examples --------------------------------------------------------------------------

    def labels(self, records, path: str) -> None:  # noqa: ARG002 - the model's own head
        return None

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Tokenized:  # noqa: ARG002
        """input_ids: the source's ids; labels: (target ids, source text, target text)."""
        self.tok = tok
        ft, eos = self.ft, tok.eos_token_id
        ids_all, out, cut = [], [], 0
        for line, rec in records:
            src = str(field_value(rec, ft.source_field, path, line, "finetune.source_field"))
            tgt = str(field_value(rec, ft.target_field, path, line, "finetune.target_field"))
            s, s_cut = _ending(tok(src)["input_ids"], eos, ft.source_len)
            t, t_cut = _ending(tok(text_target=tgt)["input_ids"], eos, ft.target_len)
            cut += s_cut or t_cut
            ids_all.append(s)
            out.append((t, src, tgt))
        return Tokenized(ids_all, out, cut)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return tk

    def lengths(self, tk: Tokenized) -> list[int]:
        """Source and target: the encoder pads to the longest source, the decoder to the longest
        target (grouping by the source alone left the targets' spread in each batch)."""
        return [len(s) + len(t[0]) for s, t in zip(tk.input_ids, tk.labels, strict=True)]

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict:
        ids, mask = pad_rows([tk.input_ids[i] for i in idx], pad_id)
        targets = [tk.labels[i][0] for i in idx]
        labels = torch.full((len(idx), max(len(t) for t in targets)), -100, dtype=torch.long)
        for j, t in enumerate(targets):
            labels[j, : len(t)] = torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "work_tokens": int(mask.sum()) + sum(len(t) for t in targets),  # encoder + decoder tokens
                "sources": [tk.labels[i][1] for i in idx], "references": [tk.labels[i][2] for i in idx]}

    # -- training and validation -----------------------------------------------------------

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token loss on target tokens, the decoder's logits). The decoder's input is the
        labels shifted right, as the model makes it when given labels; given the input instead,
        the model skips a loss of its own that would go unused, and without a cache of keys and
        values (`use_cache` is on in most configs, and only generation reads it)."""
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        start, pad = self._decoder_ids(module)
        dec = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
        dec = dec.masked_fill(dec.eq(-100), pad)
        logits = module(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=-100), logits

    def loss_weight(self, batch: dict, examples: int) -> int:  # noqa: ARG002 - a mean over target tokens
        return int((batch["labels"] != -100).sum())

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return torch.zeros(0, dtype=torch.float64)

    def _decoder_ids(self, module) -> tuple[int, int]:
        """(decoder_start_token_id, pad_token_id) of the model inside `module` (an engine's wrapper)."""
        if self.decoder_ids is None:
            inner = module
            while not hasattr(getattr(inner, "config", None), "pad_token_id") and hasattr(inner, "module"):
                inner = inner.module  # DDP's, DeepSpeed's wrappers (DeepSpeed's own `config` is a dict)
            cfg = inner.config
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
            self.decoder_ids = (int(start), int(cfg.pad_token_id))
        return self.decoder_ids

    def eval_counts(self, module, batch: dict, logits: torch.Tensor, device) -> torch.Tensor:  # noqa: ARG002
        """Generate the batch's sources and score them against their references."""
        if not self.gen.size:
            return torch.zeros(0, dtype=torch.float64)
        out = self.gen.generate(module, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        hyps = [s.strip() for s in self.tok.batch_decode(out, skip_special_tokens=True)]
        return self.gen.score(batch["sources"], hyps, batch["references"], "source")

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        return self.gen.metrics(counts)


def _ending(ids: list[int], eos: int | None, limit: int) -> tuple[list[int], bool]:
    """`ids` ending in the end-of-sequence token, at most `limit` long (cut before it)."""
    ids = list(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) <= limit:
        return ids, False
    return ids[: limit - 1] + ([eos] if eos is not None else ids[limit - 1 : limit]), True
