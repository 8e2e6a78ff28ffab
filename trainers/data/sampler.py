"""Packed samples, the seeded global sample order, blending and rank slices.

Pure numpy, no torch: the order every rank agrees on is a function of
(corpus sizes, blend weights, seed, position) alone.

- A *source* is one token stream cut into packed samples of `seq_len + 1`
  tokens, crossing document boundaries; sample i starts at token i * seq_len
  (consecutive samples share one token, the next-token target).
- Each source's samples are shuffled per epoch by a keyed Feistel permutation:
  any position maps to its sample in O(1), so nothing is built at start-up and
  the order never needs to be stored.
- Blending picks, at each global position, the source whose count lags its
  weight the most (largest deficit first): the counts stay within one sample of
  `weight * position`, so any window holds each source within +-1 of its share.
- The state is the global position and the per-source counts: resuming loads
  them and draws exactly the sample the uninterrupted run would have drawn,
  whatever the number of ranks that resumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from hpctrain.launcher.contract.corpus import TokenStream
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.split import hash_key as _key
from hpctrain.launcher.contract.split import mix64 as _mix64


@functools.lru_cache(maxsize=1024)
def _round_keys(key: int, rounds: int) -> tuple[np.uint64, ...]:
    return tuple(_key(key, r) for r in range(rounds))


def feistel_permute(x: np.ndarray, n: int, key: np.uint64, rounds: int = 6) -> np.ndarray:
    """Map positions `x` (each < n) through a keyed pseudo-random permutation of range(n).

    A balanced Feistel network over 2*h bits is a bijection on [0, 4^h); cycle
    walking (re-applying it until the value lands below n) restricts it to [0, n).
    """
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.copy()
    bits = max(int(n - 1).bit_length(), 2)
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    round_keys = _round_keys(int(key), rounds)

    def once(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix64(right ^ rk) & mask)
        return (left << np.uint64(half)) | right

    out = once(x)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = once(out[todo])
        todo = out >= np.uint64(n)
    return out


@dataclass(frozen=True)
class PackedSource:
    """A token stream cut into packed samples of `seq_len + 1` tokens."""

    stream: TokenStream
    seq_len: int

    @property
    def num_samples(self) -> int:
        return max((self.stream.num_tokens - 1) // self.seq_len, 0)

    def sample(self, i: int) -> np.ndarray:
        return self.stream.read(int(i) * self.seq_len, self.seq_len + 1)

    def document_starts(self, i: int) -> np.ndarray:
        """Offsets inside sample i where a new document begins (for attention masks)."""
        start = int(i) * self.seq_len
        return self.stream.document_starts(start, start + self.seq_len + 1) - start


def blend_choices(weights: np.ndarray, counts: np.ndarray, position: int, n: int) -> np.ndarray:
    """Sources for global positions [position, position+n); updates `counts` in place."""
    out = np.empty(n, dtype=np.int64)
    if len(weights) == 1:
        out[:] = 0
        counts[0] += n
        return out
    for j in range(n):
        deficit = weights * (position + j + 1) - counts
        s = int(np.argmax(deficit))
        out[j] = s
        counts[s] += 1
    return out


class SampleOrder:
    """The global sequence of samples (source, index) that every rank agrees on."""

    def __init__(self, sizes: list[int], weights: list[float] | None = None, seed: int = 0) -> None:
        if not sizes or any(s <= 0 for s in sizes):
            raise UserError(
                "a corpus yields no sample of this length",
                field="data",
                expected="every corpus longer than seq_len + 1 tokens",
            )
        w = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
            raise UserError(
                "blend weights must be non-negative, one per corpus, not all zero",
                field="data.weights",
            )
        self.sizes = [int(s) for s in sizes]
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.position = 0
        self.counts = np.zeros(len(sizes), dtype=np.int64)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n global samples as (source ids, sample indices within each source)."""
        sources = blend_choices(self.weights, self.counts, self.position, n)
        # the k-th draw from a source, counted from the start of the run
        nth = np.empty(n, dtype=np.int64)
        start = self.counts - np.bincount(sources, minlength=len(self.sizes))
        for s in range(len(self.sizes)):
            m = sources == s
            nth[m] = start[s] + np.arange(int(m.sum()))
        indices = np.empty(n, dtype=np.int64)
        for s, size in enumerate(self.sizes):
            m = sources == s
            if not m.any():
                continue
            epochs, pos = np.divmod(nth[m], size)
            res = np.empty(len(pos), dtype=np.int64)
            for e in np.unique(epochs):
                em = epochs == e
                res[em] = feistel_permute(pos[em], size, _key(self.seed, s, int(e))).astype(
                    np.int64
                )
            indices[m] = res
        self.position += n
        return sources, indices

    def advance(self, n: int) -> None:
        """Move past n global samples without computing their indices."""
        blend_choices(self.weights, self.counts, self.position, n)
        self.position += n

    def epoch_of(self) -> list[float]:
        """How many passes over each source have been drawn (fractional)."""
        return [c / s for c, s in zip(self.counts.tolist(), self.sizes, strict=True)]

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "counts": self.counts.tolist(),
            "sizes": list(self.sizes),
            "weights": self.weights.tolist(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("sizes", "seed"):
            if state[k] != getattr(self, k):
                raise UserError(
                    f"the data changed since the checkpoint ({k} was {state[k]}, now {getattr(self, k)})",
                    field="data",
                    expected="the same corpora, seq_len and seed as the checkpointed run",
                )
        if not np.allclose(state["weights"], self.weights):
            raise UserError("blend weights changed since the checkpoint", field="data.weights")
        self.position = int(state["position"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)

    def clone(self) -> SampleOrder:
        other = SampleOrder(self.sizes, self.weights.tolist(), self.seed)
        other.load_state_dict(self.state_dict())
        return other


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """The part of each global batch that one data-parallel rank trains on."""
    if global_batch % world_size:
        raise UserError(
            f"global batch {global_batch} does not divide among {world_size} ranks",
            field="training.global_batch",
            expected=f"a multiple of {world_size}",
        )
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)
