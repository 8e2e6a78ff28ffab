"""Scoring what a model generates at evaluation, for the kinds that do (seq2seq always, SFT when
`generation_metrics` asks): HF `generate` on the engine's `sampling()` model, the outputs
decoded and scored against reference texts (trainers/tasks/scores.py), the first outputs of an
evaluation kept beside their inputs and references for predictions/step_N.jsonl and W&B.

Under ZeRO-3 `sampling()` gathers the weights once per call; under FSDP2 it is the sharded model
(its root's parameters gathered for the call), and every rank runs as many forwards as the
slowest (HF's `synced_gpus`), since each forward gathers collectively.
"""

from __future__ import annotations

import contextlib

import torch

from hpctrain.trainers.tasks import KindBase, Start, write_rows
from hpctrain.trainers.tasks.scores import TextScores


class Generation:
    """Generates, scores and keeps outputs for a kind, as its spec section
    (`ScoresGenerations`) says: the metrics (none: off), BLEU's tokenizer, the beams, the new
    tokens and how many outputs an evaluation keeps."""

    def __init__(self, ft) -> None:
        names = ft.scored()
        self.scores = TextScores(names, ft.bleu_tokenize) if names else None
        self.size = self.scores.size if self.scores else 0
        self.num_beams, self.max_new_tokens = ft.generation.num_beams, ft.max_new_tokens()
        keep = ft.predictions_logged
        self.engine = None  # its `sampling()` gives the model to generate with (None: the module given)
        self.sync = False
        self.keep: int | None = keep  # outputs kept per evaluation (None: all)
        self.kept: list[dict] = []

    def start(self, start: Start) -> None:
        self.engine = start.engine
        self.sync = start.run.d.world_size > 1 and not start.engine.capabilities.whole_weights

    def generate(self, module, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """`generate`'s output for a padded batch, the model in eval mode for the call."""
        with self.engine.sampling() if self.engine is not None else contextlib.nullcontext(module) as model:
            was = model.training
            model.eval()
            try:
                beams = self.num_beams or getattr(model.generation_config, "num_beams", 1) or 1
                return model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, synced_gpus=self.sync, **kwargs)
            finally:
                model.train(was)

    def score(self, inputs: list[str], outputs: list[str], references: list[str], input_name: str) -> torch.Tensor:
        """The batch's statistics; its first outputs kept while the evaluation wants more."""
        if self.keep is None or len(self.kept) < self.keep:
            room = len(outputs) if self.keep is None else self.keep - len(self.kept)
            self.kept += [{input_name: i, "prediction": o, "reference": r}
                          for i, o, r in zip(inputs, outputs, references, strict=True)][:room]
        return self.scores.stats(outputs, references)

    def metrics(self, counts: torch.Tensor) -> dict:
        return self.scores.scores(counts) if self.scores else {}

    def evaluated(self, step: int, run) -> None:
        """After an evaluation: rank 0's kept outputs to predictions/step_N.jsonl and W&B."""
        kept, self.kept = self.kept, []
        path = write_rows(run, "predictions", step, kept)
        if path is not None:
            first, what = kept[0], next(iter(kept[0]))
            run.mon.print(f"  prediction: {str(first[what])[:50]!r} -> {first['prediction'][:60]!r} "
                          f"(reference {first['reference'][:60]!r})  [{len(kept)} in {path}]")


class GeneratingKind(KindBase):
    """The parts of `KindTask` a kind that scores generated text (its `gen`) has alike: the
    engine taken at the start, every output kept for `hpctrain eval`, the outputs written after
    an evaluation."""

    gen: Generation

    def before_steps(self, start: Start) -> str | None:
        self.gen.start(start)
        return None

    def keep_all_outputs(self) -> None:
        self.gen.keep = None

    def outputs(self) -> list[dict]:
        return self.gen.kept

    def evaluated(self, step: int, run) -> None:
        self.gen.evaluated(step, run)
