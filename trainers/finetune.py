"""Fine-tuning (full | lora | qlora) for SFT and classification, with the same resume guarantees.

Started by `hpctrain run SPEC` (task: finetune) like pretraining:

    torchrun --standalone --nproc-per-node 2 -m trainers.finetune --run-dir RUN_DIR
    python -m trainers.finetune --run-dir RUN_DIR                     # one process
    python -m trainers.finetune --merge RUN_DIR                       # `hpctrain merge`
    python -m trainers.finetune --eval RUN_DIR --data FILE            # `hpctrain eval`

Examples are drawn in a seeded global order (the pretraining sampler over
example indices), so resume is exact for any number of ranks; checkpoints of
LoRA runs hold only the adapter (and saved modules), optimizer, schedule,
sampler and RNG states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.errors import UserError
from launcher.paths import resolve_path
from launcher.rundir import latest_checkpoint, stop_file, write_status
from launcher.spec import RunSpec, load_spec_dict, spec_from_dict
from trainers.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint
from trainers.data.examples import (
    ExampleDataset,
    label_names,
    pack,
    read_records,
    split_indices,
    tokenize_classify,
    tokenize_sft,
)
from trainers.data.loader import TrainBatches
from trainers.distributed import Dist, init_distributed, mean_over_ranks, shutdown
from trainers.engine import DDPEngine, adamw
from trainers.model import fresh_modules_note, load_tokenizer, quiet_libraries
from trainers.monitor import Monitor, format_eta, report_preempted, user_error_exit
from trainers.peft_model import build_model, export, load_exported, merge, parameter_report
from trainers.preemption import StopRequest, die_with_parent
from trainers.pretrain import lr_lambda, seed_everything


def load_examples(spec: RunSpec, tok):
    """(train dataset, validation dataset, labels, notes) from the spec's files."""
    ft = spec.finetune
    train_path = resolve_path(ft.train_file)
    records = read_records(train_path)
    if ft.valid_file:
        valid_path = resolve_path(ft.valid_file)
        valid_records = read_records(valid_path)
    else:
        tr, va = split_indices(len(records), ft.valid_fraction, spec.training.seed)
        valid_records, records, valid_path = [records[i] for i in va], [records[i] for i in tr], train_path
    labels = None
    if ft.kind == "classify":
        labels = label_names(records, ft, train_path)
        label2id = {n: i for i, n in enumerate(labels)}
        train = tokenize_classify(records, tok, ft, label2id, train_path)
        valid = tokenize_classify(valid_records, tok, ft, label2id, valid_path) if valid_records else None
    else:
        train = tokenize_sft(records, tok, ft, train_path)
        valid = tokenize_sft(valid_records, tok, ft, valid_path) if valid_records else None
        if ft.packing:
            train = pack(train, ft.seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    notes = f"{len(train.input_ids)} training / {len(valid.input_ids) if valid else 0} validation examples"
    if train.truncated:
        notes += f"; {train.truncated} training example(s) truncated to {ft.seq_len} tokens"
    return (ExampleDataset(train, pad, ft.kind), ExampleDataset(valid, pad, ft.kind) if valid else None,
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
    """Loss (and accuracy, macro-F1 for classification) over the whole validation set."""
    model.eval()
    mine = list(range(d.rank, len(data), d.world_size))
    loss_sum, n = 0.0, 0
    conf = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.float64)
    for i in range(0, len(mine), micro):
        idx = mine[i : i + micro]
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
    model.train()
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
    return new < old if metric == "val_loss" else new > old


def train(spec: RunSpec, run_dir: Path, d: Dist, deadline: float | None = None,
          stop_path: Path | None = None, echo_to_log: bool = False) -> str:
    ft, t = spec.finetune, spec.training
    mon = Monitor(run_dir, enabled=d.is_main, echo_to_log=echo_to_log)
    print(f"rank {d.rank}/{d.world_size} on node {d.node_rank} ({socket.gethostname()}), pid {os.getpid()}",
          file=sys.stderr, flush=True)
    seed_everything(t.seed)
    tok = load_tokenizer(spec)
    train_set, valid_set, labels, notes = load_examples(spec, tok)
    mon.print(notes)
    model = build_model(spec, labels, train_set.pad_id)
    new = getattr(model, "hpctrain_new_modules", [])
    if new:
        why = "a new task head, trained" + (" and saved with the adapter" if ft.method != "full" else "")
        mon.print(fresh_modules_note(new, why))
    mon.print(parameter_report(model))
    total = spec.total_steps_for(len(train_set))
    if t.epochs is not None:
        mon.print(f"{t.epochs:g} epoch(s) of {len(train_set)} examples = {total} steps")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, t.lr, t.betas, t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total))
    engine = DDPEngine(model, optimizer, scheduler, t.grad_clip, t.precision, d,
                       trainable_only=ft.method != "full")
    batches = TrainBatches([], None, t.seed, t.global_batch, t.micro_batch, d.rank, d.world_size,
                           dataset=train_set)
    metric = ft.best_metric or ("accuracy" if ft.kind == "classify" else "val_loss")
    best, stale, step = None, 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, engine, d.rank)
        batches.load_state_dict(meta["sampler"])
        step, best, stale = meta["step"], meta.get("best"), meta.get("stale", 0)
        mon.print(f"resuming from {ckpt} (step {step})")
    mon.print(f"{spec.name}: {ft.method} {ft.kind}, {d.world_size} rank(s), global batch {t.global_batch}, "
              f"accum {batches.accum}, steps {step}->{total}, best by {metric}")
    if d.is_main:
        write_status(run_dir, state="running", step=step, total_steps=total, pid=os.getpid())
    stopper = StopRequest(stop_path or stop_file(run_dir), deadline, margin_s=5.0)
    last_save, save_s, step_s, t_start, timed = time.time(), 0.0, 0.0, time.perf_counter(), 0
    reason, early_stop = None, False
    model.train()
    while step < total and not early_stop:
        t0 = time.perf_counter()
        micro = batches.next_step()
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            with engine.micro_step(sync=i == len(micro) - 1) as module:
                loss = example_loss(module, mb, ft.kind, d.device)[0] / len(micro)
                engine.backward(loss)
            loss_sum += float(loss.detach())
        grad_norm = engine.step()
        step += 1
        (loss_mean,) = mean_over_ranks([loss_sum])
        step_s, timed = time.perf_counter() - t0, timed + 1
        if step % t.log_every == 0 or step == total:
            eta = (total - step) * (time.perf_counter() - t_start) / timed
            mon.log({"step": step, "loss": loss_mean, "lr": engine.lr, "grad_norm": grad_norm})
            mon.print(f"step {step}/{total} | loss {loss_mean:.4f} | lr {engine.lr:.2e} | eta {format_eta(eta)}")
        if valid_set is not None and ((t.eval_every and step % t.eval_every == 0) or step == total):
            res = evaluate(engine.model, valid_set, ft.kind, t.micro_batch, d, len(labels) if labels else None)
            mon.log({"step": step, **res})
            mon.print("  validation: " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()))
            if better(metric, res[metric], best):
                best, stale = res[metric], 0
                if d.is_main:
                    export(engine.model, tok, labels, run_dir / "best")
                mon.print(f"  new best {metric} {best:.4f}: saved to {run_dir / 'best'}")
            else:
                stale += 1
                early_stop = bool(ft.early_stopping_patience and stale >= ft.early_stopping_patience)
                if early_stop:
                    mon.print(f"  early stopping: {stale} evaluations without a better {metric}")
        c = spec.checkpoint
        due = checkpoint_due(c, step, last_save)
        reason, save_now = stopper.agree(due, next_step_s=step_s + save_s)
        if save_now or reason or step == total or early_stop:
            s0 = time.time()
            save_checkpoint(run_dir, step, engine, {"sampler": batches.state_dict(), "best": best, "stale": stale,
                                                    "world_size": d.world_size, "tokens_seen": 0},
                            d.rank, c.keep_last)
            last_save, save_s = time.time(), time.time() - s0
        if reason:
            break
    if reason:
        return report_preempted(mon, run_dir, d.is_main, step, total, reason)
    if d.is_main:
        if spec.export.enabled:
            export(engine.model, tok, labels, run_dir / "export")
            mon.print(f"exported to {run_dir / 'export'}")
            if ft.merge and ft.method != "full":
                mon.print(f"merged model: {merge(spec, run_dir / 'export', tok)}")
        write_status(run_dir, state="finished", step=step, total_steps=total,
                     **({"best": {metric: best}} if best is not None else {}))
    mon.close()
    return "finished"


def _frozen(run_dir: Path) -> RunSpec:
    frozen = run_dir / "spec.yaml"
    if not frozen.is_file():
        raise UserError("not a run directory (no spec.yaml)", file=str(run_dir))
    spec = spec_from_dict(load_spec_dict(frozen), str(frozen))
    if spec.task != "finetune":
        raise UserError("not a fine-tuning run", file=str(frozen), field="task", expected="finetune")
    return spec


def run_eval(run_dir: Path, data: str) -> dict:
    """Evaluate the run's export on a file of examples (`hpctrain eval`)."""
    spec = _frozen(run_dir)
    export_dir = run_dir / "export"
    if not export_dir.is_dir():
        raise UserError("no export yet (the run has not finished)", file=str(export_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    model, labels = load_exported(spec, export_dir)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir")
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--echo-to-log", action="store_true", help="copy console lines to stderr (rank log)")
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--merge", metavar="RUN_DIR", help="merge the run's adapter into its base model")
    ap.add_argument("--eval", metavar="RUN_DIR", help="evaluate the run's export on --data")
    ap.add_argument("--data", help="examples to evaluate (JSONL/CSV)")
    args = ap.parse_args(argv)
    try:
        if args.merge or args.eval:
            quiet_libraries()
        if args.merge:
            from transformers import AutoTokenizer

            run = Path(args.merge)
            spec = _frozen(run)
            tok = AutoTokenizer.from_pretrained(run / "export", local_files_only=True)
            print(f"merged model written to {merge(spec, run / 'export', tok)}")
            return 0
        if args.eval:
            if not args.data:
                raise UserError("--data is required", field="--data", expected="a JSONL or CSV file")
            print(json.dumps(run_eval(Path(args.eval), args.data)))
            return 0
        if not args.run_dir:
            ap.error("--run-dir is required")
        die_with_parent()
        run_dir = Path(args.run_dir)
        spec = _frozen(run_dir)
        torch.use_deterministic_algorithms(True, warn_only=True)
        d = init_distributed(spec.cluster.backend)
        train(spec, run_dir, d, args.deadline, Path(args.stop_file) if args.stop_file else None,
              args.echo_to_log)
    except UserError as e:
        return user_error_exit(e, args.run_dir)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
