"""Seeded choices that validation, corpus preparation and the trainers must make alike: which
examples are held out for validation. A pure function of (index, fraction, seed): the same
answer whatever the order, batching or number of workers that asks. Numpy only.

The hash (splitmix64's finalizer, keyed) is also the sampler's: trainers/data/sampler.py.
"""

from __future__ import annotations

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def hash_key(*parts: int) -> np.uint64:
    k = np.uint64(0x9E3779B97F4A7C15)
    for p in parts:
        k = np.uint64(mix64(k ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF)))
    return k


def seeded_fraction_mask(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for about `fraction` of the indices, chosen by a seeded hash of each index alone
    (so the choice does not depend on order, batching or the number of workers)."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    u = mix64(np.asarray(indices).astype(np.uint64) ^ hash_key(seed, 0x5EED)) >> np.uint64(11)
    return (u.astype(np.float64) / float(1 << 53)) < fraction


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of n examples (at least one validation example)."""
    valid = seeded_fraction_mask(np.arange(n), fraction, seed)
    if fraction > 0 and not valid.any() and n > 1:
        valid[n - 1] = True
    return [i for i in range(n) if not valid[i]], [i for i in range(n) if valid[i]]
