"""Continued pretraining (clm | mlm) on packed token corpora.

Started by `hpctrain run SPEC` / `hpctrain submit SPEC`, which freeze the spec
into RUN_DIR and start, per node:

    torchrun --standalone --nproc-per-node 2 -m hpctrain.trainers.pretrain --run-dir RUN_DIR          # one machine
    torchrun --nnodes 2 --node-rank $R --rdzv-endpoint HOST:PORT ... -m hpctrain.trainers.pretrain ... # two nodes
    python -m hpctrain.trainers.pretrain --run-dir RUN_DIR                                            # one process

What pretraining adds to the one loop (trainers/loop.py): packed samples of the blended
corpora, the objective (trainers/objective.py) and the validation loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpctrain.launcher.contract.corpus import check_token_ids, open_corpus
from hpctrain.launcher.contract.fast_exit import exit_process
from hpctrain.launcher.contract.paths import resolve_path
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import RunSpec, ValidationSet
from hpctrain.trainers import loop
from hpctrain.trainers.data.loader import TrainBatches
from hpctrain.trainers.data.sampler import PackedSource
from hpctrain.trainers.distributed import Dist, eval_slices, mean_over_ranks
from hpctrain.trainers.engines import (
    Engine,
    build_engine,
    engine_class,
    parameter_count,
)
from hpctrain.trainers.entry import Launch, entry_parser, run_entry, seed_everything
from hpctrain.trainers.kernels import use_kernels
from hpctrain.trainers.model import (
    HFExport,
    build_model,
    export_shard_bytes,
    flops_per_token,
    fresh_modules_note,
    load_tokenizer,
)
from hpctrain.trainers.objective import Objective
from hpctrain.trainers.run import Run


def open_sources(spec: RunSpec, vocab_size: int) -> list[PackedSource]:
    sources = []
    for i, ref in enumerate(spec.data.corpora):
        corpus = open_corpus(resolve_path(ref.path, field=f"data.corpora.{i}.path"))
        check_token_ids(corpus, vocab_size, split=ref.split)
        sources.append(PackedSource(corpus.split(ref.split), spec.data.seq_len))
    return sources


def evaluate(spec: RunSpec, engine, objective: Objective, source: PackedSource, d: Dist) -> float:
    """Mean loss over a fixed set of validation samples (the same at every evaluation)."""
    mb = spec.training.micro_batch
    n = min(source.num_samples, spec.training.eval_batches * mb * d.world_size)
    losses = []
    with engine.evaluating() as module:
        for idx in eval_slices(n, d, mb):
            batch_idx = idx or [0]  # an empty slice still runs its forward (ZeRO-3), not counted
            tokens = torch.from_numpy(np.stack([source.sample(k) for k in batch_idx]).astype(np.int64))
            batch = {"tokens": tokens, "positions": torch.tensor(batch_idx)}
            if spec.data.document_mask:
                batch["doc_starts"] = [torch.from_numpy(source.document_starts(k)) for k in batch_idx]
            loss = float(objective(module, batch, d.device))
            if idx:
                losses.append(loss)
    # mean over every batch of every rank (a rank with fewer batches weighs less)
    total, count = mean_over_ranks([sum(losses), float(len(losses))])
    return total / max(count, 1.0)


class Pretraining:
    """The pretraining task for the loop: packed samples of the blended corpora, the objective
    (clm | mlm), and the validation loss on a fixed set of samples."""

    def __init__(self, run: Run, objective: Objective, batches: TrainBatches,
                 valid: list[tuple[ValidationSet, PackedSource]],
                 n_params: int, tokenizer) -> None:
        self.spec, self.d, self.mon, self.export_dir = run.spec, run.d, run.mon, RunDir(run.run_dir).export
        self.objective, self.batches, self.valid = objective, batches, valid
        self.n_params, self.tokenizer = n_params, tokenizer

    def describe(self, step: int, total: int) -> str:
        spec, t = self.spec, self.spec.training
        return (f"{spec.name}: {spec.objective.type} on {self.n_params / 1e6:.2f}M params, {self.d.world_size} "
                f"rank(s), global batch {t.global_batch} x {spec.data.seq_len} tokens, accum {self.batches.accum}, "
                f"steps {step}->{total}")

    def loss(self, module, micro_batch: dict) -> torch.Tensor:
        return self.objective(module, micro_batch, self.d.device)

    def tokens(self, micro_batches: list[dict]) -> int:
        return sum(mb["tokens"].shape[0] for mb in micro_batches) * self.spec.data.seq_len

    def before_steps(self, engine: Engine, resumed: bool) -> None:  # noqa: ARG002 - nothing to ready
        return None

    def window_metrics(self) -> dict:
        return {}

    def evaluate(self, engine: Engine, step: int, total: int) -> bool:
        every = self.spec.training.eval_every
        if not self.valid or not every or (step % every != 0 and step != total):
            return False
        record, shown = {"step": step}, []
        for v, source in self.valid:  # every set, the same samples at every evaluation
            vloss = evaluate(self.spec, engine, self.objective, source, self.d)
            ppl = math.exp(min(vloss, 50))
            record.update({v.key("loss"): vloss, v.key("ppl"): ppl})
            shown.append(f"{v.name + ' ' if v.name else ''}loss {vloss:.4f} | ppl {ppl:.2f}")
        self.mon.log(record)
        self.mon.print("  validation: " + "; ".join(shown))
        return False

    def state(self) -> dict:
        return {}

    def resumed(self, state: dict, rank_state: dict | None = None) -> None:
        pass

    def rank_state(self) -> dict:
        return {}

    def export(self, engine: Engine) -> None:
        if self.spec.export.enabled:
            engine.export(HFExport(self.export_dir, self.tokenizer, max_shard_bytes=export_shard_bytes(self.spec)))
            self.mon.print(f"exported HF model to {self.export_dir}")

    def final_status(self) -> dict:
        return {}


def train(spec: RunSpec, launch: Launch, d: Dist) -> str:
    run = Run(spec, launch, d)
    t = spec.training
    seed_everything(t.seed)
    tokenizer = load_tokenizer(spec)
    engines = engine_class(spec)
    engines.prepare_model_loading(spec, d)  # ZeRO-3: weights partitioned as they load
    built = build_model(spec, on_meta=engines.loads_sharded)  # fsdp: each rank materializes its shards
    model = built.model
    kernels = use_kernels(model, spec, d.device)  # Liger's on CUDA where asked and possible
    if kernels:
        run.mon.print(kernels)
    if built.new_modules:
        run.mon.print(fresh_modules_note(built.new_modules, "the objective's head"))
    vocab_size = model.get_input_embeddings().num_embeddings
    sources = open_sources(spec, vocab_size)
    objective = Objective(spec, tokenizer, vocab_size)
    total = spec.total_steps_for(sum(s.num_samples for s in sources))
    batches = TrainBatches(sources, [c.weight for c in spec.data.corpora], t.seed, t.global_batch,
                           t.micro_batch, d.rank, d.world_size, num_workers=spec.data.num_workers,
                           with_boundaries=spec.data.document_mask)
    n_params = parameter_count(model)
    run.measure(flops_per_token(model, spec.data.seq_len))
    engine = build_engine(spec, model, d, total, batches.accum, on_meta=built.on_meta, weights_from=built.weights_from)
    objective.attach(model, whole_weights=engine.capabilities.whole_weights)
    valid = []
    for v in spec.data.validation_sets():
        vcorpus = open_corpus(resolve_path(v.path, field=v.field))
        check_token_ids(vcorpus, vocab_size, split=v.split)
        valid.append((v, PackedSource(vcorpus.split(v.split), spec.data.seq_len)))
    return loop.train(run, engine, Pretraining(run, objective, batches, valid, n_params, tokenizer), total)


def main(argv: list[str] | None = None) -> int:
    args = entry_parser(__doc__).parse_args(argv)
    if not args.run_dir:
        raise SystemExit("--run-dir is required")
    return run_entry(args, train)


if __name__ == "__main__":
    exit_process(main())
