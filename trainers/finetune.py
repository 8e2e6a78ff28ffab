"""Fine-tuning (full | lora | qlora) for SFT and classification, with the same resume guarantees.

Started by `hpctrain run SPEC` (task: finetune) like pretraining:

    torchrun --standalone --nproc-per-node 2 -m hpctrain.trainers.finetune --run-dir RUN_DIR
    python -m hpctrain.trainers.finetune --run-dir RUN_DIR                     # one process
    python -m hpctrain.trainers.finetune --merge RUN_DIR                       # `hpctrain merge`
    python -m hpctrain.trainers.finetune --eval RUN_DIR --data FILE            # `hpctrain eval`

Examples are drawn in a seeded global order (the pretraining sampler over
example indices), so resume is exact for any number of ranks; checkpoints of
LoRA runs hold only the adapter (and saved modules), optimizer, schedule,
sampler and RNG states.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.fast_exit import exit_process
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import RunSpec, metric_key
from hpctrain.trainers import loop
from hpctrain.trainers.data.examples import (
    ExampleDataset,
    label_names,
    pack,
    read_records,
    split_indices,
    tokenize_classify,
    tokenize_sft,
)
from hpctrain.trainers.data.loader import TrainBatches
from hpctrain.trainers.distributed import Dist, eval_slices
from hpctrain.trainers.engines import Engine, build_engine, engine_class
from hpctrain.trainers.entry import Launch, entry_parser, frozen_spec, run_entry, seed_everything
from hpctrain.trainers.kernels import use_kernels
from hpctrain.trainers.model import (
    HFExport,
    export_shard_bytes,
    flops_per_token,
    fresh_modules_note,
    load_tokenizer,
    mean_context,
    quiet_libraries,
)
from hpctrain.trainers.peft_model import (
    build_finetune_model,
    load_exported,
    merge,
    parameter_report,
)
from hpctrain.trainers.run import Run


def load_examples(spec: RunSpec, tok):
    """(train dataset, [(validation set name or None, its dataset)], labels, notes) from the
    spec's files: every named validation file, the single one, or a seeded split of train_file."""
    ft = spec.finetune
    train_path = resolve_path(ft.train_file)
    records = read_records(train_path)
    if ft.valid_file:
        held = [(name, resolve_path(raw), None) for name, raw, _ in ft.valid_sets()]
        held = [(name, path, read_records(path)) for name, path, _ in held]
    else:
        tr, va = split_indices(len(records), ft.valid_fraction, spec.training.seed)
        held = [(None, train_path, [records[i] for i in va])]
        records = [records[i] for i in tr]
    labels = None
    if ft.kind == "classify":
        labels = label_names(records, ft, train_path)
        label2id = {n: i for i, n in enumerate(labels)}
        train = tokenize_classify(records, tok, ft, label2id, train_path)
        valid = [(name, tokenize_classify(recs, tok, ft, label2id, path)) for name, path, recs in held if recs]
    else:
        train = tokenize_sft(records, tok, ft, train_path)
        valid = [(name, tokenize_sft(recs, tok, ft, path)) for name, path, recs in held if recs]
        if ft.packing:
            train = pack(train, ft.seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counts = " + ".join(f"{len(v.input_ids)}" + (f" ({name})" if name else "") for name, v in valid) or "0"
    notes = f"{len(train.input_ids)} training / {counts} validation examples"
    if train.truncated:
        notes += f"; {train.truncated} training example(s) truncated to {ft.seq_len} tokens"
    return (ExampleDataset(train, pad, ft.kind), [(name, ExampleDataset(v, pad, ft.kind)) for name, v in valid],
            labels, notes)


def example_loss(module, batch: dict, kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): next-token loss on response tokens (sft) or cross-entropy on labels."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = module(input_ids=ids, attention_mask=mask).logits
    if kind == "sft":
        tgt = labels[:, 1:]
        if not (tgt != -100).any():
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=-100), logits
    return F.cross_entropy(logits.float(), labels), logits


@torch.no_grad()
def evaluate(model, data: ExampleDataset, kind: str, micro: int, d: Dist, num_labels: int | None) -> dict:
    """Loss (and accuracy, macro-F1 for classification) over the whole validation set
    (`model` in eval mode: the engine's `evaluating()` or an exported model)."""
    loss_sum, n = 0.0, 0
    conf = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.float64)
    for idx in eval_slices(len(data), d, micro):
        if not idx:  # this rank has no examples left, the others do: its forward is still needed (ZeRO-3)
            example_loss(model, data.batch([0]), kind, d.device)
            continue
        batch = data.batch(idx)
        loss, logits = example_loss(model, batch, kind, d.device)
        loss_sum += float(loss) * len(idx)
        n += len(idx)
        if kind == "classify":
            pred = logits.argmax(-1).cpu()
            for t, p in zip(batch["labels"].tolist(), pred.tolist(), strict=True):
                conf[t, p] += 1
    totals = torch.cat([torch.tensor([loss_sum, float(n)], dtype=torch.float64), conf.flatten()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    out = {"val_loss": float(totals[0] / max(totals[1], 1))}
    if kind == "classify":
        conf = totals[2:].view_as(conf)
        tp = conf.diag()
        prec = tp / conf.sum(0).clamp(min=1)
        rec = tp / conf.sum(1).clamp(min=1)
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(tp))
        out["accuracy"] = float(tp.sum() / conf.sum().clamp(min=1))
        out["f1"] = float(f1.mean())
    else:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    return out


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "val_loss" or metric.endswith("/loss") else new > old


class FineTuning:
    """The fine-tuning task for the loop: examples in a seeded global order, the SFT or
    classification loss, and validation that keeps the best export and may stop early."""

    def __init__(self, run: Run, batches: TrainBatches, valid: list[tuple[str | None, ExampleDataset]], labels,
                 tok) -> None:
        self.spec, self.ft, self.d, self.mon = run.spec, run.spec.finetune, run.d, run.mon
        self.run_dir = RunDir(run.run_dir)
        self.batches, self.valid, self.labels, self.tok = batches, valid, labels, tok
        self.metric = self.ft.best()
        self.best: float | None = None
        self.stale = 0  # evaluations since the best

    def describe(self, step: int, total: int) -> str:
        ft, t = self.ft, self.spec.training
        return (f"{self.spec.name}: {ft.method} {ft.kind}, {self.d.world_size} rank(s), global batch "
                f"{t.global_batch}, accum {self.batches.accum}, steps {step}->{total}, best by {self.metric}")

    def loss(self, module, micro_batch: dict) -> torch.Tensor:
        return example_loss(module, micro_batch, self.ft.kind, self.d.device)[0]

    def tokens(self, micro_batches: list[dict]) -> int:
        return sum(int(mb["attention_mask"].sum()) for mb in micro_batches)  # without padding

    def evaluate(self, engine: Engine, step: int, total: int) -> bool:
        every = self.spec.training.eval_every
        if not self.valid or not ((every and step % every == 0) or step == total):
            return False
        res, shown = {}, []
        with engine.evaluating() as module:
            for name, data in self.valid:  # every set: its loss (and accuracy, F1), the whole set each time
                one = evaluate(module, data, self.ft.kind, self.spec.training.micro_batch, self.d,
                               len(self.labels) if self.labels else None)
                shown.append((f"{name} " if name else "") + " | ".join(f"{k} {v:.4f}" for k, v in one.items()))
                if name is not None:
                    one = {metric_key(name, k.removeprefix("val_")): v for k, v in one.items()}
                res.update(one)
        self.mon.log({"step": step, **res})
        self.mon.print("  validation: " + "; ".join(shown))
        if better(self.metric, res[self.metric], self.best):
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

    def resumed(self, state: dict) -> None:
        self.best, self.stale = state.get("best"), state.get("stale", 0)

    def export(self, engine: Engine) -> None:
        if not self.spec.export.enabled:
            return
        out = self.run_dir.export
        engine.export(HFExport(out, self.tok, self.labels, export_shard_bytes(self.spec)))
        self.mon.print(f"exported to {out}")
        if self.d.is_main and self.ft.merge and self.ft.method != "full":
            self.mon.print(f"merged model: {merge(self.spec, out, self.tok)}")

    def final_status(self) -> dict:
        return {"best": {self.metric: self.best}} if self.best is not None else {}


def train(spec: RunSpec, launch: Launch, d: Dist) -> str:
    ft, t = spec.finetune, spec.training
    run = Run(spec, launch, d)
    mon = run.mon
    seed_everything(t.seed)
    tok = load_tokenizer(spec)
    train_set, valid_set, labels, notes = load_examples(spec, tok)
    mon.print(notes)
    engine_class(spec).prepare_model_loading(spec, d)  # ZeRO-3: weights partitioned as they load
    built = build_finetune_model(spec, labels, train_set.pad_id)
    model = built.model
    kernels = use_kernels(model, spec, d.device)  # Liger's on CUDA where asked and possible
    if kernels:
        mon.print(kernels)
    if built.new_modules:
        why = "a new task head, trained" + (" and saved with the adapter" if ft.method != "full" else "")
        mon.print(fresh_modules_note(built.new_modules, why))
    mon.print(parameter_report(model))
    total = spec.total_steps_for(len(train_set))
    if t.epochs is not None:
        mon.print(f"{t.epochs:g} epoch(s) of {len(train_set)} examples = {total} steps")
    lengths = [len(x) for x in train_set.tk.input_ids] if ft.group_by_length else None
    batches = TrainBatches([], None, t.seed, t.global_batch, t.micro_batch, d.rank, d.world_size,
                           dataset=train_set, lengths=lengths)
    # achieved FLOP/s counts real tokens (padding is not model work) at their own lengths
    run.measure(flops_per_token(model, mean_context(len(x) for x in train_set.tk.input_ids)))
    engine = build_engine(spec, model, d, total, batches.accum, trainable_only=ft.method != "full",
                          on_meta=built.on_meta, weights_from=built.weights_from)
    return loop.train(run, engine, FineTuning(run, batches, valid_set, labels, tok), total)


def _frozen(run_dir: Path) -> RunSpec:
    spec = frozen_spec(run_dir)
    if spec.task != "finetune":
        raise UserError("not a fine-tuning run", file=str(RunDir(run_dir).spec_file), field="task",
                        expected="finetune")
    return spec


def run_eval(run_dir: Path, data: str) -> dict:
    """Evaluate the run's export on a file of examples (`hpctrain eval`)."""
    spec = _frozen(run_dir)
    export_dir = RunDir(run_dir).export
    if not export_dir.is_dir():
        raise UserError("no export yet (the run has not finished)", file=str(export_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    model, labels = load_exported(spec, export_dir)
    model.eval()
    ft = spec.finetune
    records = read_records(data)
    if ft.kind == "classify":
        tk = tokenize_classify(records, tok, ft, {n: i for i, n in enumerate(labels)}, data)
    else:
        tk = tokenize_sft(records, tok, ft, data)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    d = Dist(0, 1, 0, 1, torch.device("cpu"))
    res = evaluate(model, ExampleDataset(tk, pad, ft.kind), ft.kind, spec.training.micro_batch, d,
                   len(labels) if labels else None)
    return {"examples": len(tk.input_ids), **res}


def main(argv: list[str] | None = None) -> int:
    ap = entry_parser(__doc__)
    ap.add_argument("--merge", metavar="RUN_DIR", help="merge the run's adapter into its base model")
    ap.add_argument("--eval", metavar="RUN_DIR", help="evaluate the run's export on --data")
    ap.add_argument("--data", help="examples to evaluate (JSONL/CSV)")
    args = ap.parse_args(argv)
    if not (args.merge or args.eval):
        if not args.run_dir:
            ap.error("--run-dir is required")
        return run_entry(args, train)
    quiet_libraries()
    try:
        if args.merge:
            from transformers import AutoTokenizer

            run = Path(args.merge)
            spec = _frozen(run)
            tok = AutoTokenizer.from_pretrained(RunDir(run).export, local_files_only=True)
            print(f"merged model written to {merge(spec, RunDir(run).export, tok)}")
            return 0
        if not args.data:
            raise UserError("--data is required", field="--data", expected="a JSONL or CSV file")
        print(json.dumps(run_eval(Path(args.eval), args.data)))
        return 0
    except UserError as e:
        print(f"hpctrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_process(main())
