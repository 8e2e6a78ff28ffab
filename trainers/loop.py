"""The one training loop. Pretraining and fine-tuning each supply a `Task` (their data,
objective and evaluation); everything else is here, top to bottom:

    resume -> before steps -> [ fetch a step's micro-batches -> forward/backward each -> step -> log
                -> maybe evaluate -> agree on save/stop (maybe save) ] -> export -> finished
"""

from __future__ import annotations

import gc
import time
from typing import Protocol

import torch

from hpctrain.launcher.contract.checkpoints import CheckpointMeta
from hpctrain.trainers.data.loader import TrainBatches
from hpctrain.trainers.distributed import mean_over_ranks
from hpctrain.trainers.engines import Engine
from hpctrain.trainers.monitor import format_eta
from hpctrain.trainers.run import Run


class Task(Protocol):
    """What a trainer supplies to the loop."""

    batches: TrainBatches

    def describe(self, step: int, total: int) -> str:
        """The line that opens an attempt (model, ranks, batch, steps)."""

    def loss(self, module: torch.nn.Module, micro_batch: dict) -> torch.Tensor:
        """Mean loss of one micro-batch, through `module` (the engine's)."""

    def tokens(self, micro_batches: list[dict]) -> int:
        """This rank's tokens of model work in a step (padding left out)."""

    def before_steps(self, engine: Engine, resumed: bool) -> str | None:
        """Once per attempt, before its first step (DPO's reference pass); a reason to stop."""

    def window_metrics(self) -> dict:
        """At a logged step, every rank: the task's own training metrics since the last one."""

    def evaluate(self, engine: Engine, step: int, total: int) -> bool:
        """Evaluate if due at `step` (log, print, keep the best); True to stop early."""

    def state(self) -> dict:
        """The task's own part of a checkpoint (`CheckpointMeta.task`)."""

    def resumed(self, state: dict, rank_state: dict | None) -> None:
        """Take back what `state` returned (and this rank's `rank_state`), from the checkpoint
        resumed from."""

    def rank_state(self) -> dict:
        """What this rank alone keeps between steps (tensors and numbers; {}: nothing), saved in
        the checkpoint's RNG file of the rank."""

    def export(self, engine: Engine) -> None:
        """At the end of the run: write the model (where the spec asks)."""

    def final_status(self) -> dict:
        """Fields the finished state records besides the step."""


def train(run: Run, engine: Engine, task: Task, total: int) -> str:
    """Train `task` from the newest whole checkpoint to step `total`; "finished" or "preempted".

    An exception ends the attempt only once a checkpoint still being written is published.
    """
    try:
        return _train(run, engine, task, total)
    except Exception:
        run.crashed()
        raise


def _train(run: Run, engine: Engine, task: Task, total: int) -> str:
    spec, d, mon, batches = run.spec, run.d, run.mon, task.batches
    meta = run.resume(engine, batches)
    step, tokens_seen = (meta.step, meta.tokens_seen) if meta else (0, 0)
    run.checkpointer.rank_state = task.rank_state
    if meta:
        task.resumed(meta.task, meta.rank_state)
    mon.print(task.describe(step, total))
    run.started(step, total)
    reason = task.before_steps(engine, resumed=meta is not None)
    if reason:
        return run.preempted(step, total, reason, saved=False)
    # Everything built so far (model, tokenizer, libraries) lives for the whole run: keep the
    # garbage collector from rescanning it on every collection during the loop.
    gc.collect()
    gc.freeze()
    t_start, steps_timed, tokens_timed = time.perf_counter(), 0, 0
    while step < total:
        t0 = time.perf_counter()
        micro = batches.next_step()
        data_seconds = time.perf_counter() - t0
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            with engine.micro_step(sync=i == len(micro) - 1) as module:
                loss = task.loss(module, mb)
                engine.backward(loss)
            loss_sum += float(loss.detach())
        grad_norm = engine.step()
        step += 1
        loss_mean, rank_tokens = mean_over_ranks([loss_sum / len(micro), float(task.tokens(micro))])
        step_tokens = round(rank_tokens * d.world_size)
        tokens_seen, tokens_timed, steps_timed = tokens_seen + step_tokens, tokens_timed + step_tokens, steps_timed + 1
        step_seconds = time.perf_counter() - t0
        run.throughput.tick(step_seconds, data_seconds, spec.training.global_batch, step_tokens)
        if step % spec.training.log_every == 0 or step == total:
            elapsed = time.perf_counter() - t_start
            mon.log({"step": step, "loss": loss_mean, "lr": engine.lr, "grad_norm": grad_norm,
                     "tokens_seen": tokens_seen, **task.window_metrics(), **run.window_metrics()})
            mfu = f" | mfu {run.last_mfu:.1%}" if run.last_mfu is not None else ""
            mon.print(f"step {step}/{total} | loss {loss_mean:.4f} | lr {engine.lr:.2e} | "
                      f"{tokens_timed / elapsed:,.0f} tok/s{mfu} | "
                      f"eta {format_eta((total - step) * elapsed / steps_timed)}")
        stop_early = task.evaluate(engine, step, total)
        meta = CheckpointMeta(step=step, world_size=d.world_size, sampler=batches.state_dict(),
                              tokens_seen=tokens_seen, spec_name=spec.name, task=task.state())
        reason = run.after_step(step, total, step_seconds, engine, meta, force_save=stop_early)
        if reason:
            return run.preempted(step, total, reason)
        if stop_early:
            break
    task.export(engine)
    return run.finished(step, total, **task.final_status())
