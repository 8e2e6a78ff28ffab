"""Fine-tuning examples, whatever the kind: records read from JSONL (any kind) or CSV, their
tokenized form, and the dataset that pads a micro-batch. Every problem names the file, the line
and the field. What a kind makes of a record is its task module (trainers/tasks/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.records import iter_records
from hpctrain.launcher.contract.split import split_indices  # noqa: F401 - re-exported for the trainers


def read_records(path: str, tsv_columns: list[str] | None = None) -> list[tuple[int, dict]]:
    """(line number, record) from a JSONL, CSV or TSV file (`tsv_columns`: the kind's); at least
    one record."""
    out = list(iter_records(path, tsv_columns))
    if not out:
        raise UserError("no examples", file=path, expected="at least one record")
    return out


def field_value(rec: dict, name: str, path: str, line: int, spec_field: str):
    """A record's field; a missing or empty one is a user error naming file, line and field."""
    if name not in rec or rec[name] is None or rec[name] == "":
        raise UserError(f"line {line} has no field '{name}' (has {sorted(rec)})", file=path,
                        field=spec_field, expected=f"'{name}' in every record")
    return rec[name]


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list  # what the kind learns from each example (token labels, a class id...)
    truncated: int
    # each example's reference text, where generation is scored (keyword-only: the kinds' own
    # subclasses add positional fields after `truncated`)
    references: list[str] | None = field(default=None, kw_only=True)

def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows` padded on the right to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask


class ExampleDataset:
    """Tokenized examples; `__getitems__` makes one micro-batch of them, as the kind collates
    its examples (`collate(tk, indices, pad_id)`: padded to the longest)."""

    def __init__(self, tk: Tokenized, pad_id: int, collate: Callable[[Tokenized, list[int], int], dict]) -> None:
        self.tk, self.pad_id, self.collate = tk, pad_id, collate

    def __len__(self) -> int:
        return len(self.tk.input_ids)

    def __getitems__(self, keys) -> dict[str, torch.Tensor]:
        batch = self.batch([k[1] for k in keys])
        batch["draws"] = [k[2] for k in keys]  # each example's place in the run's global order
        return batch

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.collate(self.tk, idx, self.pad_id)
