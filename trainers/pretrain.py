"""Continued pretraining (clm | mlm) on packed token corpora.

Started by `hpctrain run SPEC` / `hpctrain submit SPEC`, which freeze the spec
into RUN_DIR and start, per node:

    torchrun --standalone --nproc-per-node 2 -m trainers.pretrain --run-dir RUN_DIR          # one machine
    torchrun --nnodes 2 --node-rank $R --rdzv-endpoint HOST:PORT ... -m trainers.pretrain ... # two nodes
    python -m trainers.pretrain --run-dir RUN_DIR                                            # one process

The loop below is the whole training procedure: fetch a step's micro-batches,
forward/backward each, step, log, maybe evaluate, then agree on save/stop.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from launcher.errors import UserError
from launcher.paths import resolve_path
from launcher.rundir import latest_checkpoint, stop_file, write_status
from launcher.spec import RunSpec, load_spec_dict, spec_from_dict
from trainers.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint
from trainers.data.corpus import check_token_ids, open_corpus
from trainers.data.loader import TrainBatches
from trainers.data.sampler import PackedSource
from trainers.distributed import Dist, init_distributed, mean_over_ranks, shutdown
from trainers.engine import DDPEngine, adamw
from trainers.model import build_model, fresh_modules_note, load_tokenizer
from trainers.monitor import Monitor, format_eta, report_preempted, user_error_exit
from trainers.preemption import StopRequest, die_with_parent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(spec: RunSpec, total: int):
    """Warmup then cosine/linear decay to min_lr_ratio over the run's `total` steps."""
    t = spec.training

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return f


class Objective:
    """Loss of one micro-batch of packed sequences (seq_len + 1 tokens each)."""

    def __init__(self, spec: RunSpec, tokenizer, vocab_size: int) -> None:
        self.kind = spec.objective.type
        self.mask_prob = spec.objective.mask_prob
        self.seed = spec.training.seed
        self.vocab_size = vocab_size
        if self.kind == "mlm":
            if tokenizer.mask_token_id is None:
                raise UserError(
                    "the tokenizer has no mask token", field="objective.type", expected="clm for it"
                )
            self.mask_id = tokenizer.mask_token_id
            self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, module, batch: dict, device) -> torch.Tensor:
        tokens = batch["tokens"].to(device)
        if self.kind == "clm":
            logits = module(input_ids=tokens[:, :-1]).logits
            return F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)
            )
        inputs, labels = self.mask(tokens[:, :-1].cpu(), batch["positions"])
        logits = module(input_ids=inputs.to(device)).logits
        labels = labels.to(device)
        if not (labels != -100).any():  # nothing masked in this micro-batch: contribute zero
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )

    def mask(
        self, inputs: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (80% [MASK], 10% random, 10% kept), seeded per global sample position
        so the same sample gets the same mask whatever the world size or resume point."""
        inputs, labels = inputs.clone(), inputs.clone()
        for row, pos in enumerate(positions.tolist()):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pos)
            p, r = (
                torch.rand(inputs.shape[1], generator=g),
                torch.rand(inputs.shape[1], generator=g),
            )
            rand_tok = torch.randint(self.vocab_size, (inputs.shape[1],), generator=g)
            masked = (p < self.mask_prob) & ~torch.isin(inputs[row], self.special)
            labels[row, ~masked] = -100
            inputs[row, masked & (r < 0.8)] = self.mask_id
            swap = masked & (r >= 0.8) & (r < 0.9)
            inputs[row, swap] = rand_tok[swap]
        return inputs, labels


def open_sources(spec: RunSpec, vocab_size: int) -> list[PackedSource]:
    sources = []
    for i, ref in enumerate(spec.data.corpora):
        corpus = open_corpus(resolve_path(ref.path, field=f"data.corpora.{i}.path"))
        check_token_ids(corpus, vocab_size, split=ref.split)
        sources.append(PackedSource(corpus.split(ref.split), spec.data.seq_len))
    return sources


@torch.no_grad()
def evaluate(
    spec: RunSpec, engine: DDPEngine, objective: Objective, source: PackedSource, d: Dist
) -> float:
    """Mean loss over a fixed set of validation samples (the same at every evaluation)."""
    engine.model.eval()
    mb = spec.training.micro_batch
    n = min(source.num_samples, spec.training.eval_batches * mb * d.world_size)
    mine = list(range(d.rank, n, d.world_size))
    losses = []
    for i in range(0, len(mine), mb):
        idx = mine[i : i + mb]
        tokens = torch.from_numpy(np.stack([source.sample(k) for k in idx]).astype(np.int64))
        batch = {"tokens": tokens, "positions": torch.tensor(idx)}
        with torch.autocast(
            d.device.type, dtype=torch.bfloat16, enabled=spec.training.precision == "bf16"
        ):
            losses.append(float(objective(engine.model, batch, d.device)))
    engine.model.train()
    (mean,) = mean_over_ranks([sum(losses) / max(len(losses), 1)])
    return mean


def train(
    spec: RunSpec,
    run_dir: Path,
    d: Dist,
    deadline: float | None = None,
    stop_path: Path | None = None,
    fault_pause: tuple[int, float] | None = None,
    echo_to_log: bool = False,
) -> str:
    mon = Monitor(run_dir, enabled=d.is_main, echo_to_log=echo_to_log)
    # one line per rank (in each rank's log) so a multi-node run shows who took part
    print(
        f"rank {d.rank}/{d.world_size} on node {d.node_rank} ({socket.gethostname()}), pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    seed_everything(spec.training.seed)
    tokenizer = load_tokenizer(spec)
    model = build_model(spec)
    if model.hpctrain_new_modules:
        mon.print(fresh_modules_note(model.hpctrain_new_modules, "the objective's head"))
    vocab_size = model.get_input_embeddings().num_embeddings
    sources = open_sources(spec, vocab_size)
    objective = Objective(spec, tokenizer, vocab_size)
    t = spec.training
    total = spec.total_steps_for(sum(s.num_samples for s in sources))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = adamw(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        t.lr, t.betas, t.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total))
    engine = DDPEngine(model, optimizer, scheduler, t.grad_clip, t.precision, d)
    batches = TrainBatches(
        sources,
        [c.weight for c in spec.data.corpora],
        t.seed,
        t.global_batch,
        t.micro_batch,
        d.rank,
        d.world_size,
        num_workers=spec.data.num_workers,
    )
    valid = None
    if spec.data.validation is not None:
        vref = spec.data.validation
        vcorpus = open_corpus(resolve_path(vref.path, field="data.validation.path"))
        check_token_ids(vcorpus, vocab_size, split=vref.split)
        valid = PackedSource(vcorpus.split(vref.split), spec.data.seq_len)

    step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, engine, d.rank)
        batches.load_state_dict(meta["sampler"])
        step = meta["step"]
        mon.print(
            f"resuming from {ckpt} (step {step}, {meta['tokens_seen']:,} tokens seen, "
            f"saved by {meta['world_size']} rank(s), now {d.world_size})"
        )
    n_params = sum(p.numel() for p in model.parameters())
    mon.print(
        f"{spec.name}: {spec.objective.type} on {n_params / 1e6:.2f}M params, {d.world_size} rank(s), "
        f"global batch {t.global_batch} x {spec.data.seq_len} tokens, accum {batches.accum}, "
        f"steps {step}->{total}"
    )
    if d.is_main:
        write_status(run_dir, state="running", step=step, total_steps=total, pid=os.getpid())

    tokens_per_step = t.global_batch * spec.data.seq_len
    last_save, save_seconds, step_seconds = time.time(), 0.0, 0.0
    t_start, steps_timed = time.perf_counter(), 0
    stopper = StopRequest(stop_path or stop_file(run_dir), deadline, margin_s=5.0)
    reason = None
    model.train()
    # Everything built so far (model, tokenizer, libraries) lives for the whole run: keep the
    # garbage collector from rescanning it on every collection during the loop.
    gc.collect()
    gc.freeze()
    while step < total:
        t0 = time.perf_counter()
        micro = batches.next_step()
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            with engine.micro_step(sync=i == len(micro) - 1) as module:
                loss = objective(module, mb, d.device) / len(micro)
                engine.backward(loss)
            loss_sum += float(loss.detach())
        grad_norm = engine.step()
        step += 1
        (loss_mean,) = mean_over_ranks([loss_sum])
        step_seconds = time.perf_counter() - t0
        steps_timed += 1
        if step % t.log_every == 0 or step == total:
            elapsed = time.perf_counter() - t_start
            tok_s = steps_timed * tokens_per_step / elapsed
            eta = (total - step) * elapsed / steps_timed
            mon.log(
                {
                    "step": step,
                    "loss": loss_mean,
                    "lr": engine.lr,
                    "grad_norm": grad_norm,
                    "tokens_seen": step * tokens_per_step,
                    "tokens_per_s": tok_s,
                }
            )
            mon.print(
                f"step {step}/{total} | loss {loss_mean:.4f} | lr {engine.lr:.2e} | "
                f"{tok_s:,.0f} tok/s | eta {format_eta(eta)}"
            )
        if valid is not None and t.eval_every and (step % t.eval_every == 0 or step == total):
            vloss = evaluate(spec, engine, objective, valid, d)
            mon.log({"step": step, "val_loss": vloss, "val_ppl": math.exp(min(vloss, 50))})
            mon.print(f"  validation: loss {vloss:.4f} | ppl {math.exp(min(vloss, 50)):.2f}")
        c = spec.checkpoint
        due = checkpoint_due(c, step, last_save)
        reason, save_now = stopper.agree(due, next_step_s=step_seconds + save_seconds)
        if step == total:
            save_now = True
        if save_now or reason:
            s0 = time.time()
            path = save_checkpoint(
                run_dir,
                step,
                engine,
                {
                    "tokens_seen": step * tokens_per_step,
                    "sampler": batches.state_dict(),
                    "world_size": d.world_size,
                    "spec_name": spec.name,
                },
                d.rank,
                c.keep_last,
                pause_before_commit_s=fault_pause[1]
                if fault_pause and fault_pause[0] == step
                else 0.0,
            )
            last_save, save_seconds = time.time(), time.time() - s0
            mon.print(f"  checkpoint: {path} ({save_seconds:.1f}s)")
        if reason:
            break

    if reason:
        return report_preempted(mon, run_dir, d.is_main, step, total, reason)
    if spec.export.enabled:
        engine.export(run_dir / "export", tokenizer, d.rank)
        mon.print(f"exported HF model to {run_dir / 'export'}")
    if d.is_main:
        write_status(run_dir, state="finished", step=step, total_steps=total)
    mon.close()
    return "finished"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stop-file", default=None, help="file whose existence asks the run to save and stop")
    ap.add_argument("--echo-to-log", action="store_true", help="copy console lines to stderr (rank log)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="epoch seconds by which a checkpoint must exist",
    )
    args = ap.parse_args(argv)
    die_with_parent()
    # environment is read here, at the entry point, and passed down as values
    fault = os.environ.get(
        "HPCTRAIN_FAULT_PAUSE_BEFORE_COMMIT_S", ""
    )  # "STEP:SECONDS": tests kill a rank mid-save
    fault_step, _, fault_s = fault.partition(":")
    fault_pause = (int(fault_step), float(fault_s)) if fault else None
    run_dir = Path(args.run_dir)
    frozen = run_dir / "spec.yaml"
    try:
        spec = spec_from_dict(load_spec_dict(frozen), str(frozen))
        torch.use_deterministic_algorithms(True, warn_only=True)
        d = init_distributed(spec.cluster.backend)
        stop_path = Path(args.stop_file) if args.stop_file else None
        train(spec, run_dir, d, args.deadline, stop_path, fault_pause, args.echo_to_log)
    except UserError as e:
        return user_error_exit(e, run_dir)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
