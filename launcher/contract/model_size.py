"""A model's parameter counts, as `hpctrain plan` needs them: counted by the trainers' own
model factory (`python -m hpctrain.trainers.model_size`, on the meta device) and read back
by the launcher as one JSON line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSize:
    total: int
    trainable: int
    quantized: int  # frozen parameters held in 4 bits (QLoRA)
    largest_layer: int
    hidden: int
    layers: int
    vocab: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSize:
        return cls(**json.loads(text))
