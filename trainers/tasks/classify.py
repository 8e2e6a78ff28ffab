"""Sequence classification (`finetune.kind: classify`): text -> one of the labels, through a
classification head over the model. Labels come from the spec or, sorted (numbers first), from
the training file. Validation reports the loss, accuracy and macro-F1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import ClassifySpec
from hpctrain.trainers.data.examples import Tokenized, field_value, pad_rows
from hpctrain.trainers.tasks import KindBase


class Classify(KindBase):
    """The classify kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "SEQ_CLS"

    def __init__(self, ft: ClassifySpec) -> None:
        self.ft = ft
        self.num_labels = 0

    def labels(self, records, path: str) -> list[str]:
        return label_names(records, self.ft, path)

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Tokenized:
        self.num_labels = len(labels or [])
        return tokenize_classify(records, tok, self.ft, {n: i for i, n in enumerate(labels or [])}, path)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return tk

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([tk.input_ids[i] for i in idx], pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([tk.labels[i] for i in idx], dtype=torch.long)}

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy on the labels, logits)."""
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = module(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits.float(), labels), logits

    @property
    def counts_size(self) -> int:
        return self.num_labels * self.num_labels  # the confusion matrix

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """This batch's confusion matrix (true label x prediction), flattened."""
        conf = torch.zeros((self.num_labels, self.num_labels), dtype=torch.float64)
        pred = logits.argmax(-1).cpu()
        for t, p in zip(batch["labels"].tolist(), pred.tolist(), strict=True):
            conf[t, p] += 1
        return conf.flatten()

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        conf = counts.view(self.num_labels, self.num_labels)
        tp = conf.diag()
        prec = tp / conf.sum(0).clamp(min=1)
        rec = tp / conf.sum(1).clamp(min=1)
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(tp))
        return {"accuracy": float(tp.sum() / conf.sum().clamp(min=1)), "f1": float(f1.mean())}


def label_names(records, ft, path: str) -> list[str]:
    if ft.labels is not None:
        return list(ft.labels)
    names = {str(field_value(rec, ft.label_field, path, line, "finetune.label_field")) for line, rec in records}
    return sorted(names, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))


def tokenize_classify(records, tok, ft, label2id: dict[str, int], path: str) -> Tokenized:
    ids_all, labels, cut = [], [], 0
    for line, rec in records:
        text = str(field_value(rec, ft.text_field, path, line, "finetune.text_field"))
        label = str(field_value(rec, ft.label_field, path, line, "finetune.label_field"))
        if label not in label2id:
            raise UserError(f"line {line}: unknown label '{label}'", file=path, field="finetune.label_field",
                            expected=f"one of {sorted(label2id)}")
        ids = tok(text, truncation=False)["input_ids"]
        if len(ids) > ft.seq_len:
            ids, cut = ids[: ft.seq_len], cut + 1
        ids_all.append(ids)
        labels.append(label2id[label])
    return Tokenized(ids_all, labels, cut)
