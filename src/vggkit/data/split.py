"""Seeded, stratified index selection shared by --val-split, --subset and fixed test splits."""

from __future__ import annotations

import numpy as np


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``counts`` (largest remainder, seeded ties)."""
    quota = counts * (total / counts.sum())
    take = np.floor(quota).astype(np.int64)
    rest = total - int(take.sum())
    if rest > 0:
        # Random tie-breaking first, then a stable sort by remainder keeps it seeded and fair.
        order = rng.permutation(len(counts))
        order = order[np.argsort(-(quota - take)[order], kind="stable")]
        take[order[:rest]] += 1
    return np.minimum(take, counts)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out), each sorted, holding out ``round(N * fraction)`` samples.

    Every class gives up its share; a class never loses its last sample to the held-out side
    unless it has only one. At least one sample is held out when ``fraction > 0``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    held_total = int(round(n * fraction))
    if fraction > 0:
        held_total = min(max(held_total, 1), max(n - 1, 0))
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = _allocate(counts, held_total, rng)
    # Keep at least one training sample per class where possible, moving the excess elsewhere.
    over = (take >= counts) & (counts > 1)
    take[over] = counts[over] - 1
    deficit = held_total - int(take.sum())
    if deficit > 0:
        room = counts - 1 - take
        for c in rng.permutation(len(counts)):
            add = min(deficit, max(int(room[c]), 0))
            take[c] += add
            deficit -= add
            if deficit == 0:
                break
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        held.append(rng.permutation(members)[: take[c]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` samples spread as evenly as possible over the classes, seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = np.zeros(len(classes), dtype=np.int64)
    left = size
    # Water-filling: equal shares, classes that run out hand their remainder to the others.
    while left > 0:
        open_ = np.flatnonzero(take < counts)
        if len(open_) == 0:
            break
        share, extra = divmod(left, len(open_))
        grant = np.full(len(open_), share, dtype=np.int64)
        grant[rng.permutation(len(open_))[:extra]] += 1
        grant = np.minimum(grant, counts[open_] - take[open_])
        take[open_] += grant
        left -= int(grant.sum())
    picked = [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
