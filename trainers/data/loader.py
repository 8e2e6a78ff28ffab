"""Training batches for one rank, with an exact `state_dict()` for resume.

`TrainBatches.next_step()` returns the micro-batches this rank trains on for one
optimizer step. The authoritative `SampleOrder` advances only when a step is
handed out, so a checkpoint taken between steps records exactly what was
consumed, even while DataLoader workers prefetch ahead from a copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpctrain.launcher.contract.errors import UserError
from hpctrain.trainers.data.sampler import PackedSource, SampleOrder, rank_slice


class PackedDataset(Dataset):
    """Map-style dataset over several packed sources; a key is (source id, sample index)."""

    def __init__(self, sources: list[PackedSource], with_boundaries: bool = False) -> None:
        self.sources = sources
        self.with_boundaries = with_boundaries

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.sources)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> dict[str, torch.Tensor | list]:
        """A whole micro-batch at once: one int64 array filled in place (no per-sample tensors).

        A key is (source id, sample index in that source, global position); the
        position lets per-sample randomness (MLM masks) ignore world size and resume.
        """
        seq = self.sources[keys[0][0]].seq_len + 1
        tokens = np.empty((len(keys), seq), dtype=np.int64)
        for row, (src, idx, _) in enumerate(keys):
            tokens[row] = self.sources[src].sample(idx)
        out: dict[str, torch.Tensor | list] = {
            "tokens": torch.from_numpy(tokens),
            "positions": torch.tensor([k[2] for k in keys], dtype=torch.int64),
        }
        if self.with_boundaries:
            out["doc_starts"] = [
                torch.from_numpy(self.sources[s].document_starts(i)) for s, i, _ in keys
            ]
        return out


def collate(batch: dict) -> dict:
    """The dataset already returns a collated micro-batch (see `__getitems__`)."""
    return batch


class LengthGroups:
    """A single source's sample order regrouped so that every micro-batch holds examples of
    similar length (less padding: a micro-batch is padded to its longest example).

    The order is cut into windows of `steps` global batches at fixed positions; inside a
    window the samples are sorted by length (longest first, ties by position) and cut into
    groups of `unit` (the micro-batch), whose order is then shuffled with the seed and the
    window's number. A step made of several micro-batches (gradient accumulation, or several
    ranks) so holds groups from anywhere in the window: its gradient mixes short and long
    examples as an ungrouped step's does, while each micro-batch is padded little. With one
    micro-batch per step (`unit` = the global batch) the whole step is of one length.
    What a position holds depends only on the seed, the position and `unit`, so any resume
    point and any number of ranks (with the same micro-batch) see the same steps; every sample
    still appears exactly as often.
    """

    def __init__(self, order: SampleOrder, lengths, global_batch: int, steps: int = 50,
                 unit: int | None = None) -> None:
        if len(order.sizes) != 1:
            raise ValueError("length grouping needs a single source")
        self.sizes, self.seed = list(order.sizes), order.seed
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch, self.window = global_batch, global_batch * steps
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None
        self.regroup(unit or global_batch)

    def regroup(self, unit: int) -> None:
        """Groups of `unit` examples from now on (a resumed run keeps its checkpoint's)."""
        if self.global_batch % unit:
            raise ValueError(f"a length group of {unit} does not divide the global batch {self.global_batch}")
        self.unit, self._cached = int(unit), None

    def take(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, sample indices) at positions start .. start + n of the grouped order."""
        src, idx = [], []
        for w in range(start // self.window, (start + n - 1) // self.window + 1):
            ws, wi = self._window_samples(w)
            lo, hi = max(start, w * self.window) - w * self.window, min(start + n, (w + 1) * self.window) - w * self.window
            src.append(ws[lo:hi])
            idx.append(wi[lo:hi])
        return np.concatenate(src), np.concatenate(idx)

    def _window_samples(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is not None and self._cached[0] == w:
            return self._cached[1], self._cached[2]
        order = SampleOrder(self.sizes, None, self.seed)
        order.load_state_dict({**order.state_dict(), "position": w * self.window, "counts": [w * self.window]})
        src, idx = order.take(self.window)
        by_length = np.lexsort((np.arange(self.window), -self.lengths[idx]))
        groups = by_length.reshape(-1, self.unit)
        shuffled = groups[np.random.default_rng([self.seed, w, 0x9E3779B9]).permutation(len(groups))].reshape(-1)
        self._cached = (w, src[shuffled], idx[shuffled])
        return self._cached[1], self._cached[2]


class _RankMicroBatches:
    """Batch sampler: yields this rank's micro-batches of keys, step after step, forever."""

    def __init__(
        self, order: SampleOrder, global_batch: int, micro_batch: int, rank: int, world: int,
        groups: LengthGroups | None = None,
    ):
        self.order, self.global_batch, self.micro_batch = order, global_batch, micro_batch
        self.mine = rank_slice(global_batch, rank, world)
        self.groups = groups

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        ahead = max(1, 4096 // self.global_batch)  # draw many steps at once: numpy work is per call
        while True:
            start = self.order.position
            if self.groups is None:
                src, idx = self.order.take(self.global_batch * ahead)
            else:
                src, idx = self.groups.take(start, self.global_batch * ahead)
                self.order.advance(self.global_batch * ahead)
            for step in range(ahead):
                lo, hi = (
                    step * self.global_batch + self.mine.start,
                    step * self.global_batch + self.mine.stop,
                )
                s, i = src[lo:hi].tolist(), idx[lo:hi].tolist()
                pos = list(range(start + lo, start + hi))
                for k in range(0, len(s), self.micro_batch):
                    sl = slice(k, k + self.micro_batch)
                    yield list(zip(s[sl], i[sl], pos[sl], strict=True))


class TrainBatches:
    """Per-step micro-batches for one data-parallel rank.

    Args:
        global_batch: samples per optimizer step over all ranks.
        micro_batch: samples per forward/backward on one rank; the number of
            micro-batches per step (gradient accumulation) is derived.
        num_workers: DataLoader worker processes (0 reads in this process,
            which measured fastest on small CPU machines).
    """

    def __init__(
        self,
        sources: list[PackedSource],
        weights: list[float] | None,
        seed: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        with_boundaries: bool = False,
        dataset=None,
        lengths=None,
    ) -> None:
        per_rank = rank_slice(global_batch, rank, world_size)
        per_rank_n = per_rank.stop - per_rank.start
        if per_rank_n % micro_batch:
            raise UserError(
                f"per-rank batch {per_rank_n} is not a multiple of micro batch {micro_batch}",
                field="training.micro_batch",
                expected=f"a divisor of {per_rank_n}",
            )
        self.accum = per_rank_n // micro_batch
        # `dataset`: any object with __len__ and __getitems__(keys) (fine-tuning examples);
        # by default the packed token sources
        self.dataset = dataset if dataset is not None else PackedDataset(sources, with_boundaries)
        sizes = [len(dataset)] if dataset is not None else [s.num_samples for s in sources]
        self.order = SampleOrder(sizes, weights, seed)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        # `lengths` (one per example of `dataset`): micro-batches of examples of similar length
        self.groups = LengthGroups(self.order, lengths, global_batch, unit=micro_batch) if lengths is not None else None
        self._it: Iterator | None = None

    def _iterator(self) -> Iterator[dict]:
        sampler = _RankMicroBatches(
            self.order.clone(), self.global_batch, self.micro_batch, self.rank, self.world_size,
            self.groups,
        )
        if self.num_workers == 0:
            return (self.dataset.__getitems__(keys) for keys in sampler)
        return iter(
            DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=collate,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=False,
                prefetch_factor=4,
            )
        )

    def next_step(self) -> list[dict]:
        """The micro-batches of the next optimizer step for this rank."""
        if self._it is None:
            self._it = self._iterator()
        micro = [next(self._it) for _ in range(self.accum)]
        self.order.advance(self.global_batch)  # the authoritative order moves only now
        return micro

    @property
    def consumed_samples(self) -> int:
        return self.order.position

    def state_dict(self) -> dict:
        state = self.order.state_dict()
        if self.groups is not None:
            state["length_unit"] = self.groups.unit
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        unit = state.pop("length_unit", None)
        self.order.load_state_dict(state)
        if self.groups is not None:
            # a checkpoint from before micro-batch groups (no unit) goes on grouping whole steps:
            # the order the run began with, so the window it stopped in is not drawn twice
            self.groups.regroup(unit or self.global_batch)
        self._it = None  # restart prefetching from the loaded position


class RepeatedSteps:
    """The micro-batches of each step of `inner` for `times` optimizer steps in a row (GRPO's
    num_iterations: one generation, several updates). Each micro-batch says which of its steps
    this is (`iteration`, from 0) and which batch of the order (`cycle`: the position it starts
    at). A checkpoint between a batch's steps holds the order where that batch starts and the
    steps of it done: the resumed run fetches the same batch and goes on with the next step."""

    def __init__(self, inner: TrainBatches, times: int) -> None:
        self.inner, self.times = inner, times
        self.accum, self.dataset = inner.accum, inner.dataset
        self.micro: list[dict] | None = None
        self.done = 0  # steps of the current batch taken
        self.start: dict = inner.state_dict()  # the order where the current batch starts
        self.cycle = 0
        self._resume_done = 0

    def next_step(self) -> list[dict]:
        if self.micro is None or self.done >= self.times:
            self.start, self.cycle = self.inner.state_dict(), self.inner.consumed_samples
            self.micro, self.done, self._resume_done = self.inner.next_step(), self._resume_done, 0
        for mb in self.micro:
            mb["iteration"], mb["cycle"] = self.done, self.cycle
        self.done += 1
        return self.micro

    @property
    def consumed_samples(self) -> int:
        return self.inner.consumed_samples

    def state_dict(self) -> dict:
        if self.micro is not None and self.done < self.times:
            return {"batch_start": self.start, "steps_done": self.done}
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "batch_start" in state:
            self.inner.load_state_dict(state["batch_start"])
            self._resume_done = int(state["steps_done"])
        else:
            self.inner.load_state_dict(state)
            self._resume_done = 0
        self.micro = None
