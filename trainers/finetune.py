"""Fine-tuning (full | lora | qlora) of every kind (trainers/tasks/), with the same resume guarantees.

Started by `hpctrain run SPEC` (task: finetune) like pretraining:

    torchrun --standalone --nproc-per-node 2 -m hpctrain.trainers.finetune --run-dir RUN_DIR
    python -m hpctrain.trainers.finetune --run-dir RUN_DIR                     # one process

Any kind (trainers/tasks/) runs through here: the kind supplies its examples, batches, loss and
validation metrics; this module keeps the best export and stops early. `hpctrain merge` and
`hpctrain eval` are trainers/exported.py.

Examples are drawn in a seeded global order (the pretraining sampler over
example indices), so resume is exact for any number of ranks; checkpoints of
LoRA runs hold only the adapter (and saved modules), optimizer, schedule,
sampler and RNG states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpctrain.launcher.contract.fast_exit import exit_process
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import RunSpec, metric_key
from hpctrain.trainers import loop
from hpctrain.trainers.data.examples import ExampleDataset, read_records, split_indices
from hpctrain.trainers.data.loader import RepeatedSteps, TrainBatches
from hpctrain.trainers.distributed import Dist, eval_slices, sum_over_ranks
from hpctrain.trainers.engines import Engine, build_engine, engine_class
from hpctrain.trainers.entry import Launch, entry_parser, run_entry, seed_everything
from hpctrain.trainers.kernels import use_kernels
from hpctrain.trainers.model import (
    BuiltModel,
    HFExport,
    export_shard_bytes,
    flops_per_token,
    fresh_modules_note,
    load_tokenizer,
    mean_context,
)
from hpctrain.trainers.peft_model import build_finetune_model, merge, parameter_report
from hpctrain.trainers.run import Run
from hpctrain.trainers.tasks import KindTask, Start, kind_task


def load_examples(spec: RunSpec, tok, kind: KindTask):
    """(train dataset, [(validation set name or None, its dataset)], labels, notes) from the
    spec's files: every named validation file, the single one, or a seeded split of train_file."""
    ft = spec.finetune
    train_path = resolve_path(ft.train_file)
    records = read_records(train_path, ft.tsv_columns())
    if ft.valid_file:
        held = [(name, resolve_path(raw), None) for name, raw, _ in ft.valid_sets()]
        held = [(name, path, read_records(path, ft.tsv_columns())) for name, path, _ in held]
    else:
        tr, va = split_indices(len(records), ft.valid_fraction, spec.training.seed)
        held = [(None, train_path, [records[i] for i in va])]
        records = [records[i] for i in tr]
    labels = kind.labels(records, train_path)
    train = kind.for_training(kind.tokenize(records, tok, train_path, labels))
    valid = [(name, kind.tokenize(recs, tok, path, labels)) for name, path, recs in held if recs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counts = " + ".join(f"{len(v.input_ids)}" + (f" ({name})" if name else "") for name, v in valid) or "0"
    notes = f"{len(train.input_ids)} training / {counts} validation examples"
    if train.truncated:
        notes += f"; {train.truncated} training example(s) {ft.truncation_note()}"
    return (ExampleDataset(train, pad, kind.collate),
            [(name, ExampleDataset(v, pad, kind.collate)) for name, v in valid], labels, notes)


@torch.no_grad()
def evaluate(model, data: ExampleDataset, kind: KindTask, micro: int, d: Dist) -> dict:
    """The loss and the kind's metrics over the whole validation set, summed over the ranks
    (`model` in eval mode: the engine's `evaluating()` or an exported model). `val_loss` is the
    mean over the set's examples, or its target tokens where the kind's loss is a token mean:
    the same whatever the batches, the micro batch or the rank count."""
    loss_sum, n = 0.0, 0
    counts = torch.zeros(kind.counts_size, dtype=torch.float64)
    for idx in eval_slices(len(data), d, micro):
        if not idx:  # this rank has no examples left, the others do: its forwards are still needed (ZeRO-3)
            _, logits = kind.loss(model, data.batch([0]), d.device)
            kind.eval_counts(model, data.batch([0]), logits, d.device)
            continue
        batch = data.batch(idx)
        loss, logits = kind.loss(model, batch, d.device)
        weight = kind.loss_weight(batch, len(idx))  # the loss is a mean over these (examples or tokens)
        loss_sum += float(loss) * weight
        n += weight
        counts += kind.eval_counts(model, batch, logits, d.device)
    totals = torch.cat([torch.tensor([loss_sum, float(n)], dtype=torch.float64), counts])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    val_loss = float(totals[0] / max(totals[1], 1))
    return {"val_loss": val_loss, **kind.metrics(val_loss, totals[2:])}


class FineTuning:
    """The fine-tuning task for the loop: examples in a seeded global order, the SFT or
    classification loss, and validation that keeps the best export and may stop early."""

    def __init__(self, run: Run, kind: KindTask, batches: TrainBatches, valid: list[tuple[str | None, ExampleDataset]],
                 labels, tok, model: torch.nn.Module, initial_model: Callable[[], BuiltModel]) -> None:
        self.spec, self.ft, self.d, self.mon, self.kind = run.spec, run.spec.finetune, run.d, run.mon, kind
        self.run, self.model, self.initial_model = run, model, initial_model
        self.datasets = [("train", batches.dataset)] + [("valid" if n is None else f"valid-{n}", v) for n, v in valid]
        self.run_dir = RunDir(run.run_dir)
        self.batches, self.valid, self.labels, self.tok = batches, valid, labels, tok
        self.metric = self.ft.best()
        self.best: float | None = None
        self.stale = 0  # evaluations since the best
        self.window = torch.zeros(kind.counts_size, dtype=torch.float64)  # logged steps' counts (DPO)

    def describe(self, step: int, total: int) -> str:
        ft, t = self.ft, self.spec.training
        return (f"{self.spec.name}: {ft.method} {ft.kind}, {self.d.world_size} rank(s), global batch "
                f"{t.global_batch}, accum {self.batches.accum}, steps {step}->{total}, best by {self.metric}")

    def loss(self, module, micro_batch: dict) -> torch.Tensor:
        loss, out = self.kind.loss(module, micro_batch, self.d.device)
        if self.kind.logs_training_metrics:
            self.window += self.kind.counts(micro_batch, out)
        return loss

    def before_steps(self, engine: Engine, resumed: bool) -> str | None:
        return self.kind.before_steps(Start(self.run, engine, self.model, self.datasets, resumed, self.initial_model))

    def window_metrics(self) -> dict:
        if not self.kind.logs_training_metrics:
            return {}
        counts = sum_over_ranks(self.window)
        self.window = torch.zeros_like(self.window)
        return self.kind.metrics(float("nan"), counts)

    def tokens(self, micro_batches: list[dict]) -> int:
        # without padding; GRPO's are its prompts with their completions (`work_tokens`)
        return sum(mb.get("work_tokens", int(mb["attention_mask"].sum())) for mb in micro_batches)

    def evaluate(self, engine: Engine, step: int, total: int) -> bool:
        every = self.spec.training.eval_every
        if not self.valid or not ((every and step % every == 0) or step == total):
            return False
        res, shown = {}, []
        with engine.evaluating() as module:
            for name, data in self.valid:  # every set: its loss (and accuracy, F1), the whole set each time
                one = evaluate(module, data, self.kind, self.spec.training.micro_batch, self.d)
                shown.append((f"{name} " if name else "") + " | ".join(f"{k} {v:.4f}" for k, v in one.items()))
                one = {metric_key(name, k.removeprefix("val_")): v for k, v in one.items()}
                res.update(one)
        self.mon.log({"step": step, **res})
        self.mon.print("  validation: " + "; ".join(shown))
        self.kind.evaluated(step, self.run)
        if self.best is None or (res[self.metric] > self.best if self.ft.higher_is_better(self.metric)
                                 else res[self.metric] < self.best):
            self.best, self.stale = res[self.metric], 0
            engine.export(HFExport(self.run_dir.best, self.tok, self.labels, export_shard_bytes(self.spec)))
            self.mon.print(f"  new best {self.metric} {self.best:.4f}: saved to {self.run_dir.best}")
            return False
        self.stale += 1
        patience = self.ft.early_stopping_patience
        if patience and self.stale >= patience:
            self.mon.print(f"  early stopping: {self.stale} evaluations without a better {self.metric}")
            return True
        return False

    def state(self) -> dict:
        return {"best": self.best, "stale": self.stale}

    def resumed(self, state: dict, rank_state: dict | None = None) -> None:
        self.best, self.stale = state.get("best"), state.get("stale", 0)
        self.kind.resumed_rank(rank_state)

    def rank_state(self) -> dict:
        return self.kind.rank_state()

    def export(self, engine: Engine) -> None:
        if not self.spec.export.enabled:
            return
        out = self.run_dir.export
        engine.export(HFExport(out, self.tok, self.labels, export_shard_bytes(self.spec)))
        self.mon.print(f"exported to {out}")
        if self.d.is_main and self.ft.merge and self.ft.trains.adapter:
            self.mon.print(f"merged model: {merge(self.spec, out, self.tok)}")

    def final_status(self) -> dict:
        return {"best": {self.metric: self.best}} if self.best is not None else {}


def train(spec: RunSpec, launch: Launch, d: Dist) -> str:
    ft, t = spec.finetune, spec.training
    run = Run(spec, launch, d)
    mon = run.mon
    seed_everything(t.seed)
    tok = load_tokenizer(spec)
    kind = kind_task(ft)
    train_set, valid_set, labels, notes = load_examples(spec, tok, kind)
    mon.print(notes)
    engine_class(spec).prepare_model_loading(spec, d)  # ZeRO-3: weights partitioned as they load
    built = build_finetune_model(spec, labels, train_set.pad_id)
    model = built.model
    kernels = use_kernels(model, spec, d.device)  # Liger's on CUDA where asked and possible
    if kernels:
        mon.print(kernels)
    if built.new_modules:
        why = "a new task head, trained" + (" and saved with the adapter" if ft.trains.adapter else "")
        mon.print(fresh_modules_note(built.new_modules, why))
    if built.trains:
        mon.print(f"freeze: {built.trains}")
    mon.print(parameter_report(model))
    total = spec.total_steps_for(len(train_set))
    if t.epochs is not None:
        mon.print(f"{t.epochs:g} epoch(s) of {len(train_set)} examples = {total} steps")
    lengths = kind.lengths(train_set.tk) if ft.group_by_length else None
    batches = TrainBatches([], None, t.seed, t.global_batch, t.micro_batch, d.rank, d.world_size,
                           dataset=train_set, lengths=lengths)
    if ft.updates_per_batch() > 1:
        batches = RepeatedSteps(batches, ft.updates_per_batch())
    # achieved FLOP/s counts real tokens (padding is not model work) at their own lengths
    run.measure(flops_per_token(model, mean_context(len(x) for x in train_set.tk.input_ids)))
    engine = build_engine(spec, model, d, total, batches.accum, trainable_only=ft.trains.adapter,
                          on_meta=built.on_meta, weights_from=built.weights_from)
    task = FineTuning(run, kind, batches, valid_set, labels, tok, model,
                      initial_model=lambda: build_finetune_model(spec, labels, train_set.pad_id))
    return loop.train(run, engine, task, total)


def main(argv: list[str] | None = None) -> int:
    ap = entry_parser(__doc__)
    args = ap.parse_args(argv)
    if not args.run_dir:
        ap.error("--run-dir is required")
    return run_entry(args, train)


if __name__ == "__main__":
    exit_process(main())
