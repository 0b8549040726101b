"""Images that stay on disk: rows of a memory-mapped uint8 array, gathered a batch at a time.

A photo folder's decoded cache is one ``.npy`` file of (N, C, S, S) uint8 canvases (each photo
at the top-left, its aspect ratio kept) and an (N, 2) array of each photo's true height and
width. ``MappedImages`` is a split of it: the array, memory-mapped read-only, and the rows the
split holds. Indexing with an index array gives another split of the same file, so holding
out validation or taking a subset copies nothing; ``gather`` reads a batch's rows into memory.
The page cache, not the process, holds what was read: a folder larger than memory trains, at
the price of reading from disk what the page cache could not keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class MappedImages:
    """A split of a memory-mapped (N, C, S, S) uint8 image file, with per-image true sizes."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, sizes: np.ndarray, path: str = "") -> None:
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"expected a uint8 (N, C, H, W) array, got {array.dtype} {array.shape}")
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.all_sizes = np.asarray(sizes, dtype=np.int64)  # (N, 2): every row's (height, width)
        self.path = path

    @classmethod
    def open(cls, images: Path, sizes: Path, rows: np.ndarray | None = None) -> MappedImages:
        array = np.load(images, mmap_mode="r", allow_pickle=False)
        hw = np.load(sizes, allow_pickle=False)
        return cls(array, np.arange(len(array)) if rows is None else rows, hw, str(images))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, c, h, w = self.array.shape
        return (len(self.rows), int(c), int(h), int(w))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        """Bytes of this split's images once read."""
        _, c, h, w = self.shape
        return len(self.rows) * c * h * w

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> MappedImages:
        """Another split of the same file: ``index`` picks among this split's rows."""
        return MappedImages(self.array, self.rows[index], self.all_sizes, self.path)

    def sizes(self) -> torch.Tensor:
        """(len, 2) int64 true (height, width) of this split's images."""
        return torch.from_numpy(self.all_sizes[self.rows])

    def gather(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The canvases at positions ``index`` of this split, as a new (B, C, S, S) uint8 tensor.

        Rows are read in file order (then put back in batch order): sequential reads of a
        memory-mapped file are several times faster than random ones on a cold cache."""
        pos = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        rows = self.rows[pos]
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        batch[order] = self.array[rows[order]]
        return torch.from_numpy(batch)

    def load(self) -> torch.Tensor:
        """The whole split in memory (one tensor)."""
        return self.gather(np.arange(len(self.rows)))

    def sample(self, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvases, true sizes) of up to ``count`` of this split's images, a seeded choice."""
        pick = np.sort(np.random.default_rng(seed).permutation(len(self.rows))[:count])
        return self.gather(pick), self.sizes()[pick]


def region_stats(canvases: torch.Tensor, sizes: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) over the true region of each canvas."""
    n, c, s, _ = canvases.shape
    if n == 0:
        return (0.0,) * c, (1.0,) * c
    r = torch.arange(s)
    mask = ((r[None, :, None] < sizes[:, 0, None, None]) & (r[None, None, :] < sizes[:, 1, None, None]))
    count = mask.sum().double()
    sums = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for lo in range(0, n, 256):  # bounded float memory
        x = canvases[lo:lo + 256].double() / 255.0 * mask[lo:lo + 256, None]
        sums += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
