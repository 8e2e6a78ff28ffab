"""The reference log-probs of preference training: what the model the run started from gives
each response. Decided once per run by `finetune.reference` (`DpoSpec.reference_kind`):

    adapter      lora, qlora: the policy itself with its adapters off (peft's `disable_adapter`),
                 in the same forward context: no second copy
    model        full: a frozen copy of the initial model, held as the engine holds the policy
                 (`Engine.frozen`: whole under DDP, partitioned under ZeRO-3, sharded under FSDP2)
    precompute   full: one pass over every set's pairs before step 1, each rank its share, stored
                 in the run dir and read back by every later attempt

A precomputed reference is part of the resume contract. It is written as parts of
`reference_chunk_pairs` pairs, `reference/<set>/<first pair>.npy` (float64 [pairs, 2]: chosen,
rejected) with a `.json` beside it holding the array's SHA-256 and a fingerprint of the pairs'
tokens and the model; the `.json` is written last, so a part without one was never finished.
A restart, a requeue or a resume on another rank count reads the parts and computes none; a
part that is damaged (checksum, shape, fingerprint) is said and computed again; a stop during
the pass (signal, stop file, deadline) ends the attempt resumable after the part in hand, and
the next attempt computes only the parts that are missing. Before step 1 the policy is the
initial model and does the pass; after it (a part damaged later) a frozen copy of the initial
model is built for the pass and dropped after it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpctrain.launcher.contract.finetune import DpoSpec
from hpctrain.launcher.contract.rundir import RunDir, atomic_write_bytes, atomic_write_text
from hpctrain.trainers.data.examples import ExampleDataset, Tokenized
from hpctrain.trainers.distributed import eval_slices, from_main_rank, sum_over_ranks
from hpctrain.trainers.tasks import Start

Scorer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(module the policy runs through, input_ids, attention_mask, labels) -> each row's summed
reference log-probs of its response tokens."""


@dataclass
class Pairs(Tokenized):
    """Tokenized preference pairs: `input_ids` the chosen sides, `labels` the rejected sides
    (each prompt + response), `prompt_lens` the prompt's tokens in both."""

    prompt_lens: list[int] = field(default_factory=list)
    reference: torch.Tensor | None = None
    """float64 [pairs, 2]: the precomputed reference log-probs (chosen, rejected), or None."""


def reference_source(ft: DpoSpec, start: Start | None, scored: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[Scorer | None, str | None]:
    """(what scores a batch that carries no precomputed log-probs, a reason to stop): the
    reference the spec asks for, made ready (precompute: every set's pairs hold theirs)."""
    how = ft.reference_kind()
    if how == "adapter":
        return _adapters_off(scored), None
    run = start.run
    if how == "model":
        built = start.initial_model()
        frozen = start.engine.frozen(built.model, on_meta=built.on_meta, weights_from=built.weights_from)
        run.mon.print("reference: a frozen copy of the initial model, held as the engine holds the policy")
        return _through(frozen, scored), None
    return None, Precompute(ft, start, scored).compute()


def _adapters_off(scored) -> Scorer:
    def score(module, ids, mask, labels):
        with torch.no_grad(), peft_model(module).disable_adapter():
            return scored(module, ids, mask, labels)[0]
    return score


def _through(frozen: torch.nn.Module, scored) -> Scorer:
    def score(module, ids, mask, labels):  # noqa: ARG001 - the frozen copy, not the policy
        return scored(frozen, ids, mask, labels)[0]
    return score


def peft_model(module: torch.nn.Module):
    """The PeftModel inside an engine's module (DDP and DeepSpeed wrap it as `.module`)."""
    from peft import PeftModel

    m = module
    while not isinstance(m, PeftModel):
        m = m.module
    return m


class Precompute:
    """The reference pass of `reference: precompute` over every set, resumable part by part."""

    def __init__(self, ft: DpoSpec, start: Start, scored) -> None:
        self.ft, self.start, self.scored = ft, start, scored
        self.run, self.d = start.run, start.run.d
        self.root = RunDir(self.run.run_dir).reference
        self.model_id = json.dumps([self.run.spec.model.model_dump(mode="json"), self.run.spec.training.precision],
                                   sort_keys=True)
        self._copy = None  # a frozen copy of the initial model, when the policy has moved on

    def compute(self) -> str | None:
        """Every set's reference log-probs into its pairs; a reason to stop, or None."""
        try:
            for name, data in self.start.datasets:
                reason = self._set(name, data)
                if reason:
                    return reason
            return None
        finally:
            self._copy = None
            gc.collect()

    def _set(self, name: str, data: ExampleDataset) -> str | None:
        tk: Pairs = data.tk
        n, size = len(tk.input_ids), self.ft.reference_chunk_pairs
        parts = list(range(0, n, size))
        store = PartStore(self.root / name, _fingerprint(tk, self.model_id))
        values = torch.zeros(n, 2, dtype=torch.float64)
        have = [0] * len(parts)
        if self.d.is_main:
            for k, first in enumerate(parts):
                got, why = store.read(first, min(size, n - first))
                if got is not None:
                    values[first : first + len(got)], have[k] = got, 1
                elif why:
                    self.run.mon.print(f"reference log-probs {store.path(first)} are damaged ({why}): computed again")
        have = from_main_rank(have)
        values = sum_over_ranks(values)  # rank 0's, on every rank
        missing = [first for k, first in enumerate(parts) if not have[k]]
        mon = self.run.mon
        if not missing:
            mon.print(f"reference log-probs of {name} ({n} pairs): read from {store.root}")
            tk.reference = values
            return None
        mon.print(f"reference log-probs of {name} ({n} pairs): {n - sum(min(size, n - f) for f in missing)} "
                  f"stored, computing {len(missing)} part(s) of up to {size} pairs")
        with self._scoring() as module:
            for first in missing:
                t0 = time.perf_counter()
                idx = list(range(first, min(first + size, n)))
                values[first : first + len(idx)] = self._part(module, data, idx)
                if self.d.is_main:
                    store.write(first, values[first : first + len(idx)])
                self.run.watchdog.beat(0)
                reason, _ = self.run.stopper.agree(False, next_step_s=time.perf_counter() - t0)
                if reason:
                    mon.print(f"reference pass of {name} stopped ({reason}) after pairs {first}-{idx[-1]}: "
                              "the parts written are kept, the next attempt computes the rest")
                    return reason
        tk.reference = values
        return None

    @contextlib.contextmanager
    def _scoring(self):
        """The initial model for the pass: the policy before step 1, else a frozen copy."""
        if not self.start.resumed:
            with self.start.engine.evaluating() as module:
                yield module
            return
        if self._copy is None:
            built = self.start.initial_model()
            self._copy = self.start.engine.frozen(built.model, on_meta=built.on_meta,
                                                  weights_from=built.weights_from)
            self.run.mon.print("reference pass after step 0: through a frozen copy of the initial model")
        yield self._copy

    @torch.no_grad()
    def _part(self, module, data: ExampleDataset, idx: list[int]) -> torch.Tensor:
        """The pairs `idx` scored, each rank its share (every rank gets the whole part);
        batched by length, as little padding as the part allows."""
        tk = data.tk
        by_length = sorted(range(len(idx)), key=lambda j: len(tk.input_ids[idx[j]]) + len(tk.labels[idx[j]]))
        out = torch.zeros(len(idx), 2, dtype=torch.float64)
        device = self.d.device
        for mine in eval_slices(len(idx), self.d, self.run.spec.training.micro_batch):
            rows = [by_length[k] for k in mine]
            # a rank out of pairs still runs a forward: ZeRO-3 and FSDP2 gather collectively
            batch = data.batch([idx[j] for j in rows] or [idx[0]])
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            logps = self.scored(module, ids, mask, labels)[0].double().cpu()
            if rows:
                out[rows] = logps.reshape(2, -1).T
        return sum_over_ranks(out)


class PartStore:
    """The stored parts of one set's reference log-probs (see the module's docstring)."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = root, fingerprint

    def path(self, first: int) -> Path:
        return self.root / f"{first:09d}.npy"

    def read(self, first: int, pairs: int) -> tuple[torch.Tensor | None, str | None]:
        """(the part, None), or (None, what is wrong with it: None where it was never finished)."""
        sidecar = self.path(first).with_suffix(".json")
        if not sidecar.exists():
            return None, None
        try:
            info = json.loads(sidecar.read_text())
            raw = self.path(first).read_bytes()
        except (OSError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}"
        if info.get("fingerprint") != self.fingerprint:
            return None, "computed for other pairs or another model"
        if hashlib.sha256(raw).hexdigest() != info.get("sha256"):
            return None, "checksum mismatch"
        array = np.load(io.BytesIO(raw), allow_pickle=False)
        if array.shape != (pairs, 2) or array.dtype != np.float64:
            return None, f"shape {array.shape} {array.dtype}, expected ({pairs}, 2) float64"
        return torch.from_numpy(array.copy()), None

    def write(self, first: int, values: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.save(buf, values.numpy(), allow_pickle=False)
        raw = buf.getvalue()
        atomic_write_bytes(self.path(first), raw)
        atomic_write_text(self.path(first).with_suffix(".json"), json.dumps(
            {"pairs": len(values), "sha256": hashlib.sha256(raw).hexdigest(), "fingerprint": self.fingerprint}))


def _fingerprint(tk: Pairs, model_id: str) -> str:
    """What the stored log-probs depend on: the pairs' tokens and the model (its spec section)."""
    h = hashlib.sha256(model_id.encode())
    h.update(json.dumps([tk.input_ids, tk.labels, tk.prompt_lens]).encode())
    return h.hexdigest()
