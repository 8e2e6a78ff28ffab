"""What the kinds that learn from preference pairs (reward, dpo) share: one side of a pair read
from its record and checked, and the refusal of a prompt that leaves no room for a response.

A pair is a prompt with a chosen and a rejected response: strings, or in chat form (TRL's
conversational format: the prompt a list of messages, each response a list holding one
assistant message, rendered with the tokenizer's chat template as SFT does).
"""

from __future__ import annotations

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import PairsBase
from hpctrain.trainers.data.examples import field_value


def side(ft: PairsBase, rec: dict, path: str, line: int, field: str) -> tuple[object, object]:
    """(prompt, response) of the side `field` (chosen_field or rejected_field) of a record:
    both strings, or a list of messages and a list of one message."""
    prompt = field_value(rec, ft.prompt_field, path, line, "finetune.prompt_field")
    response = field_value(rec, field, path, line, f"finetune.{spec_field(ft, field)}")
    chat = isinstance(prompt, list), isinstance(response, list)
    if any(chat) and not (all(chat) and len(response) == 1):
        raise UserError(f"line {line}: a chat pair has a list of messages as the prompt and a list of "
                        "one assistant message as each response", file=path,
                        field=f"finetune.{spec_field(ft, field)}")
    return prompt, response


def no_room(ft: PairsBase, path: str, line: int, prompt_tokens: int) -> UserError:
    """The error of a prompt that takes `prompt_tokens` of seq_len, leaving none for a response."""
    return UserError(f"line {line}: the prompt alone takes {prompt_tokens} tokens: no room for a "
                     f"response at seq_len {ft.seq_len}", file=path, field="finetune.seq_len",
                     expected="a longer seq_len, or a shorter prompt")


def spec_field(ft: PairsBase, field: str) -> str:
    """The spec field that names record field `field`."""
    return "chosen_field" if field == ft.chosen_field else "rejected_field"
