"""A reward model from preference pairs (`finetune.kind: reward`).

Each example is a pair: a prompt with a chosen and a rejected response, as strings or in chat
form (the prompt a list of messages, each response a list holding one assistant message, TRL's
conversational format; rendered with the tokenizer's chat template as SFT does). A one-output
sequence-classification head scores prompt + response; the loss is the Bradley-Terry one,
-log sigmoid(r_chosen - r_rejected), with TRL's optional centring term. Both sides of a pair are
cut by one rule: prompt + response (with the tokenizer's own markers, such as BERT's [CLS] and
[SEP]) to `seq_len` tokens, the prompt first (a pair is counted
once when either side is cut). Chosen and rejected go through the model in one forward.
Validation reports the loss, `accuracy` (the share of pairs ranked right) and `margin` (the
mean r_chosen - r_rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import RewardSpec
from hpctrain.trainers.data.examples import Tokenized, pad_rows
from hpctrain.trainers.tasks import KindBase
from hpctrain.trainers.tasks.pairs import no_room, side
from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE, chat_ids


class Reward(KindBase):
    """The reward kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "SEQ_CLS"
    counts_size = 3  # pairs, pairs ranked right, sum of margins

    def __init__(self, ft: RewardSpec) -> None:
        self.ft = ft

    def labels(self, records, path: str) -> list[str]:  # noqa: ARG002 - one output, whatever the data
        return ["reward"]

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Tokenized:  # noqa: ARG002
        """`input_ids`: the chosen sides; `labels`: the rejected sides (each prompt + response)."""
        chosen, rejected, cut = [], [], 0
        for line, rec in records:
            problem = self.ft.record_problem(rec)
            if problem is not None:
                raise UserError(f"line {line}: {problem}", file=path)
            pair = [self._side(rec, tok, path, line, field) for field in (self.ft.chosen_field,
                                                                         self.ft.rejected_field)]
            cut += any(len(ids) > self.ft.seq_len for ids in pair)
            chosen.append(pair[0][: self.ft.seq_len])
            rejected.append(pair[1][: self.ft.seq_len])
        return Tokenized(chosen, rejected, cut)

    def _side(self, rec: dict, tok, path: str, line: int, field: str) -> list[int]:
        prompt, response = side(self.ft, rec, path, line, field)
        if not isinstance(prompt, list):
            prompt_tokens = len(tok(PROMPT_TEMPLATE.format(prompt=prompt))["input_ids"])
            if prompt_tokens >= self.ft.seq_len:
                raise no_room(self.ft, path, line, prompt_tokens)
        return scoring_ids(prompt, response, tok, path, line, self.ft.prompt_field)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return tk

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The chosen sides of the pairs, then their rejected sides: 2 x len(idx) rows."""
        ids, mask = pad_rows([tk.input_ids[i] for i in idx] + [tk.labels[i] for i in idx], pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean Bradley-Terry loss over the pairs, the rewards: chosen then rejected)."""
        ids, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask"))
        rewards = module(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        if self.ft.center_rewards_coefficient:
            loss = loss + self.ft.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss, rewards

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        chosen, rejected = logits.detach().double().cpu().chunk(2)
        return torch.tensor([len(chosen), float((chosen > rejected).sum()), float((chosen - rejected).sum())],
                            dtype=torch.float64)

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        n = max(float(counts[0]), 1.0)
        return {"accuracy": float(counts[1]) / n, "margin": float(counts[2]) / n}


def scoring_ids(prompt, response, tok, path: str = "", line: int = 0, field: str = "prompt") -> list[int]:
    """The ids a reward model scores for prompt + response: chat messages with the response as
    the assistant's turn (the chat template), or one text in the SFT prompt template with the
    model's own markers around it ([CLS] ... [SEP] for BERT; none for most decoders). The reward
    kind trains on these and GRPO scores its completions with them."""
    if isinstance(prompt, list):
        response = response if isinstance(response, list) else [{"role": "assistant", "content": str(response)}]
        prompt_ids, response_ids = chat_ids(prompt + response, tok, path, line, field, "finetune.prompt_field")
        return prompt_ids + response_ids
    return tok(PROMPT_TEMPLATE.format(prompt=prompt) + str(response))["input_ids"]
