"""Fine-tuning kinds inside a training process: one module per kind, one class each.

    sft.py        prompt -> response (or chat messages): loss on the response, perplexity
    classify.py   text -> label: a classification head, accuracy and macro-F1
    reward.py     preference pairs -> a scalar score: Bradley-Terry loss, pair accuracy, margin
    dpo.py        preference pairs -> a policy: DPO / IPO loss against a reference, TRL's metrics
    grpo.py       prompts -> a policy: sampled completions, rewards, group advantages, clipped loss
    seq2seq.py    source -> target (encoder-decoder): loss on the target, generated outputs scored
    scores.py     BLEU, chrF, ROUGE-L of generated text from statistics summed over ranks
    pairs.py      what the two pair kinds share: a pair's prompt and responses, checked

A kind's spec section (its fields, the metrics it reports and which way each is better, the
transformers class of its model) is its class in `launcher/contract/finetune.py`; here is what
it does with examples and a model. `trainers/finetune.py` runs any kind through the one loop.
Adding a kind: a spec class there (and its line in `KINDS`), a module here (and its line in
`kind_task`), its tests and its page in the docs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hpctrain.trainers.data.examples import ExampleDataset, Tokenized


@dataclass
class Start:
    """What a kind may use once the engine is built and the run resumed (`before_steps`)."""

    run: object
    """The attempt (trainers/run.py `Run`): console, run dir, the stop agreement, the watchdog."""
    engine: object
    """The engine that trains the model (trainers/engines `Engine`)."""
    model: torch.nn.Module
    """The model as built (the engine holds the same modules)."""
    datasets: list[tuple[str, ExampleDataset]]
    """("train", its examples), then each validation set ("valid" or "valid-<name>")."""
    resumed: bool
    """A checkpoint was loaded: the model is no longer the one the run started from."""
    initial_model: Callable[[], object]
    """Builds another copy of the model the run started from (a `BuiltModel`)."""


class KindTask(Protocol):
    """What a fine-tuning kind supplies to the fine-tuning trainer."""

    peft_task_type: str
    """peft's `TaskType` name for its adapters (CAUSAL_LM, SEQ_CLS...)."""

    counts_size: int
    """Length of the vector `counts` returns (summed over batches and ranks)."""

    logs_training_metrics: bool
    """Training steps log `metrics` of the step's micro-batches too (DPO's rewards/...)."""

    def labels(self, records: list[tuple[int, dict]], path: str) -> list[str] | None:
        """The label names of a classification head, from the training records (None: no head)."""

    def tokenize(self, records: list[tuple[int, dict]], tok, path: str, labels: list[str] | None) -> Tokenized:
        """Its examples tokenized, long ones truncated and counted."""

    def for_training(self, tk: Tokenized) -> Tokenized:
        """The training examples as trained on (sft: packed where the spec asks)."""

    def lengths(self, tk: Tokenized) -> list[int]:
        """What length grouping sorts the training examples by: the tokens a batch is padded
        over (the input; seq2seq: source and target together)."""

    def collate(self, tk: Tokenized, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The micro-batch of examples `idx`: input_ids, attention_mask (padded on the right)
        and what the loss needs."""

    def loss(self, module: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss of a micro-batch, the model's logits)."""

    def loss_weight(self, batch: dict, examples: int) -> int:
        """What `loss` of this micro-batch is a mean over (its `examples`, or its target tokens):
        validation weighs each batch's loss by it, so that `val_loss` is the mean over the whole
        set whatever the batches (the micro batch, the rank count, `hpctrain eval`)."""

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """What validation sums besides the loss (float64, `counts_size` long)."""

    def eval_counts(self, module: torch.nn.Module, batch: dict, logits: torch.Tensor, device) -> torch.Tensor:
        """What validation sums for a batch, given the model too (seq2seq generates with it):
        `counts` unless the kind needs more. Every rank calls it as often (a rank without
        examples left with a stand-in batch, its result dropped)."""

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:
        """Validation metrics beyond `val_loss`, from the summed counts."""

    def before_steps(self, start: Start) -> str | None:
        """Once the engine is built and the run resumed, before the first step of an attempt;
        a reason to stop (the run is resumable), or None."""

    def use_initial_model(self, build: Callable[[], torch.nn.Module]) -> None:
        """Scoring an export (`hpctrain eval`): `build` makes the model the run started from."""

    def evaluated(self, step: int, run) -> None:
        """After an evaluation at `step`, every rank (GRPO writes its sample completions)."""

    def rank_state(self) -> dict:
        """What this rank keeps between steps beyond the model (GRPO's kept generations):
        tensors and numbers, saved in the checkpoint's RNG file of the rank."""

    def resumed_rank(self, state: dict | None) -> None:
        """The rank's `rank_state` of the checkpoint resumed from (None: it holds none)."""

    def keep_all_outputs(self) -> None:
        """Scoring an export (`hpctrain eval`): keep every output the evaluation generates."""

    def outputs(self) -> list[dict]:
        """What the last evaluation generated and kept ({source, prediction, reference}...)."""


class KindBase:
    """What most kinds do for the optional parts of `KindTask`: nothing."""

    logs_training_metrics = False

    def lengths(self, tk: Tokenized) -> list[int]:
        return [len(x) for x in tk.input_ids]

    def before_steps(self, start: Start) -> str | None:  # noqa: ARG002
        return None

    def loss_weight(self, batch: dict, examples: int) -> int:  # noqa: ARG002 - a mean over examples
        return examples

    def eval_counts(self, module, batch: dict, logits: torch.Tensor, device) -> torch.Tensor:  # noqa: ARG002
        return self.counts(batch, logits)

    def keep_all_outputs(self) -> None:
        return None

    def outputs(self) -> list[dict]:
        return []

    def use_initial_model(self, build: Callable[[], torch.nn.Module]) -> None:  # noqa: ARG002
        return None

    def evaluated(self, step: int, run) -> None:  # noqa: ARG002
        return None

    def rank_state(self) -> dict:
        return {}

    def resumed_rank(self, state: dict | None) -> None:  # noqa: ARG002
        return None


def write_rows(run, name: str, step: int, rows: list[dict]):
    """What an evaluation kept (GRPO's sample completions, generated predictions), from rank 0:
    to RUN_DIR/<name>/step_N.jsonl and the W&B table `name`; the file's path (None on the other
    ranks or with nothing kept)."""
    import json

    from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text

    if not run.d.is_main or not rows:
        return None
    path = RunDir(run.run_dir).root / name / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    run.mon.table(step, name, rows)
    return path


def kind_task(ft) -> KindTask:
    """The task of the spec's `finetune.kind`."""
    from hpctrain.trainers.tasks.classify import Classify
    from hpctrain.trainers.tasks.dpo import DPO
    from hpctrain.trainers.tasks.grpo import GRPO
    from hpctrain.trainers.tasks.reward import Reward
    from hpctrain.trainers.tasks.seq2seq import Seq2Seq
    from hpctrain.trainers.tasks.sft import SFT

    return {"sft": SFT, "classify": Classify, "reward": Reward, "dpo": DPO, "grpo": GRPO,
            "seq2seq": Seq2Seq}[ft.kind](ft)
