"""Direct preference optimisation (`finetune.kind: dpo`): a causal LM, the policy, learns to prefer
the chosen response of each pair over the rejected one, measured against a reference model (the
one the run started from):

    x    = (log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))      log-probs of the response tokens
    loss = -(1 - s) log sigmoid(beta x) - s log sigmoid(-beta x)        loss_type sigmoid, label_smoothing s
    loss = (x - 1 / (2 beta))^2, on per-token mean log-probs            loss_type ipo

Both sides of a pair go through the model in one forward (chosen rows, then rejected rows);
labels are -100 on the prompt and the padding, so only response tokens count. Both responses are
cut by one rule: the prompt kept whole, each response cut so prompt + response fits `seq_len`
(a pair counted once when either side is cut). The reference log-probs come from
trainers/tasks/reference.py: the policy with its adapters off (lora, qlora), a pass of the
initial model stored in the run dir before step 1 (precompute), or a frozen copy (model).

Logged under TRL's names: rewards/chosen = beta (log pi(y+) - log ref(y+)), rewards/rejected,
rewards/accuracies (the share of pairs whose chosen reward is higher), rewards/margins,
logps/chosen, logps/rejected; at validation eval_<name> (val/<set>/<name> for named sets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import DpoSpec
from hpctrain.trainers.data.examples import Tokenized, pad_rows
from hpctrain.trainers.tasks import KindBase, Start
from hpctrain.trainers.tasks.pairs import no_room, side
from hpctrain.trainers.tasks.reference import Pairs, reference_source
from hpctrain.trainers.tasks.sft import chat_ids, plain_ids

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


class DPO(KindBase):
    """The dpo kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "CAUSAL_LM"
    counts_size = 1 + len(STATS)  # pairs, then the sum of each statistic
    logs_training_metrics = True

    def __init__(self, ft: DpoSpec) -> None:
        self.ft = ft
        self.reference = None  # what scores a batch when it carries no precomputed log-probs
        self.trims = False  # the model computes logits at the positions asked only (`scored`)

    def labels(self, records, path: str) -> None:  # noqa: ARG002 - the model's own head
        return None

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Pairs:  # noqa: ARG002
        """`input_ids`: the chosen sides, `labels`: the rejected sides (each prompt + response),
        `prompt_lens`: the prompt's tokens, the same on both sides."""
        chosen, rejected, prompts, cut = [], [], [], 0
        for line, rec in records:
            problem = self.ft.record_problem(rec)
            if problem is not None:
                raise UserError(f"line {line}: {problem}", file=path)
            (prompt, good), (_, bad) = (self._side(rec, tok, path, line, f)
                                        for f in (self.ft.chosen_field, self.ft.rejected_field))
            room = self.ft.seq_len - len(prompt)
            if room < 1:
                raise no_room(self.ft, path, line, len(prompt))
            cut += len(good) > room or len(bad) > room
            chosen.append(prompt + good[:room])
            rejected.append(prompt + bad[:room])
            prompts.append(len(prompt))
        return Pairs(chosen, rejected, cut, prompts)

    def _side(self, rec: dict, tok, path: str, line: int, field: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of one side, as SFT tokenizes a prompt and its response."""
        prompt, response = side(self.ft, rec, path, line, field)
        if isinstance(prompt, list):
            return chat_ids(prompt + response, tok, path, line, self.ft.prompt_field, "finetune.prompt_field")
        return plain_ids(prompt, response, tok)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return tk

    def collate(self, tk: Pairs, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The chosen sides, then the rejected sides (2 x len(idx) rows); labels -100 but on the
        responses; the pairs' precomputed reference log-probs where the run has them."""
        rows = [tk.input_ids[i] for i in idx] + [tk.labels[i] for i in idx]
        ids, mask = pad_rows(rows, pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        for j, i in enumerate(idx + idx):
            labels[j, : tk.prompt_lens[i]] = -100
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if tk.reference is not None:
            batch["reference_logps"] = tk.reference[idx]  # [pairs, 2]: chosen, rejected
        return batch

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean DPO loss over the pairs, the pairs' statistics [pairs, STATS])."""
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if "reference_logps" in batch:
            ref = batch["reference_logps"].to(device=device, dtype=torch.float32).T.reshape(-1)
        else:
            ref = self.reference(module, ids, mask, labels)
        logps, tokens = self.scored(module, ids, mask, labels)
        return dpo_loss(self.ft, logps, ref.to(logps.dtype), tokens)

    def scored(self, module, ids: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each row's summed log-probs of its response tokens, their count) through `module`.
        Where the model can (`logits_to_keep`), its head and the softmax run only over the
        positions from the batch's first response token on: prompts are most of a pair's tokens,
        and the vocabulary-wide logits of the prompt positions are never used."""
        kwargs = {}
        if self.trims:
            first = int((labels != -100).to(torch.int8).argmax(1).min())
            kwargs["logits_to_keep"] = min(ids.shape[1], ids.shape[1] - first + 1)
        return sequence_logps(module(input_ids=ids, attention_mask=mask, **kwargs).logits, labels)

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        stats = logits.detach().double().cpu()
        return torch.cat([torch.tensor([float(len(stats))], dtype=torch.float64), stats.sum(0)])

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        n = max(float(counts[0]), 1.0)
        return {name: float(counts[1 + i]) / n for i, name in enumerate(STATS)}

    def before_steps(self, start: Start) -> str | None:
        """Turn the policy's dropout off (where asked), and get the reference ready: on the
        fly, or precomputed for every set (which may be stopped, and resumes)."""
        if self.ft.disable_dropout:
            disable_dropout(start.model)
        self.trims = keeps_logits(start.model)
        self.reference, reason = reference_source(self.ft, start, self.scored)
        return reason

    def use_initial_model(self, build) -> None:
        from hpctrain.trainers.engines import Frozen

        if self.ft.reference_kind() == "adapter":
            self.reference, _ = reference_source(self.ft, None, self.scored)
        else:
            frozen = Frozen(build())
            self.reference = lambda module, ids, mask, labels: self.scored(frozen, ids, mask, labels)[0]  # noqa: ARG005


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each row's log-probs of its labelled tokens, their count), in float32: the token
    at t is predicted by the logits at t - 1; `logits` may cover the last positions only (the
    labels before them must be -100)."""
    target = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
    kept = target != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * kept).sum(-1), kept.sum(-1)


def dpo_loss(ft: DpoSpec, logps: torch.Tensor, ref: torch.Tensor,
             tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the pairs, [pairs, STATS]) from the policy's and the reference's summed
    log-probs of each row (chosen rows, then rejected rows) and each row's response tokens."""
    if ft.loss_type == "ipo":  # IPO compares per-token means (as TRL does)
        logps, ref = logps / tokens.clamp(min=1), ref / tokens.clamp(min=1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    x = (chosen - ref_chosen) - (rejected - ref_rejected)
    if ft.loss_type == "ipo":
        losses = (x - 1 / (2 * ft.beta)) ** 2
    else:
        s = ft.label_smoothing
        losses = -F.logsigmoid(ft.beta * x) * (1 - s) - F.logsigmoid(-ft.beta * x) * s
    with torch.no_grad():
        good, bad = ft.beta * (chosen - ref_chosen), ft.beta * (rejected - ref_rejected)
        stats = torch.stack([good, bad, (good > bad).to(good.dtype), good - bad, chosen, rejected], dim=1)
    return losses.mean(), stats


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of the model off, attention's included (TRL's `disable_dropout`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
