"""Images that stay on disk: rows of a memory-mapped uint8 array, gathered a batch at a time.

A photo folder's decoded cache is one ``.npy`` file of (N, C, S, S) uint8 canvases (each photo
at the top-left, its aspect ratio kept) and an (N, 2) array of each photo's true height and
width. ``MappedImages`` is a split of it: the array, memory-mapped read-only, and the rows the
split holds. Indexing with an index array gives another split of the same file, so holding
out validation or taking a subset copies nothing; ``gather`` reads a batch's rows into memory.

A file-backed split reads its rows with ``pread``, not through the mapping: faulting a mapped
page in pulls its neighbours in too (readahead) and counts all of them in the process's
resident memory: 2,000 rows sampled from a 4.5 GB cache left 2.9 GB resident. Read, the rows
go through the page cache, which the kernel gives back under pressure, and the process holds
only the batch: a folder larger than memory trains, at the price of reading from disk what
the page cache could not keep.
"""

from __future__ import annotations

import os
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
        self._fd: tuple[int, int] | None = None  # (pid, descriptor): not shared over a fork

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def _file(self) -> int | None:
        """A descriptor of the array's file, or None when the array is not a plain memory map."""
        if not isinstance(self.array, np.memmap) or not self.array.flags.c_contiguous \
                or self.array.filename is None:
            return None
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.array.filename, os.O_RDONLY))
        return self._fd[1]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

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
        fd = self._file()
        if fd is None:
            batch[order] = self.array[rows[order]]
            return torch.from_numpy(batch)
        row_bytes, start = batch[0].nbytes if len(batch) else 0, self.array.offset
        for i in order:
            view = memoryview(batch[i]).cast("B")
            if os.preadv(fd, [view], start + int(rows[i]) * row_bytes) != row_bytes:
                raise OSError(f"{self.array.filename}: short read at row {rows[i]} (truncated?)")
        return torch.from_numpy(batch)

    def load(self) -> torch.Tensor:
        """The whole split in memory (one tensor)."""
        return self.gather(np.arange(len(self.rows)))

    def sample_positions(self, count: int, seed: int = 0) -> np.ndarray:
        """Up to ``count`` of this split's positions, a seeded choice, in file order."""
        return sample_positions(len(self.rows), count, seed)


def sample_positions(n: int, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` of the positions 0..n-1 (all when fewer), drawn once with ``seed``, in
    file order. A folder's images come sorted by class, so the first N would not do."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def region_stats(images: MappedImages, positions: np.ndarray, chunk: int = 32
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) over the true region of the canvases at
    ``positions``, read ``chunk`` at a time: the memory it takes does not grow with the sample
    (a 2,000-photo sample at 280 px read at once took 2 GB of float working memory)."""
    c, s = images.shape[1], images.shape[2]
    if len(positions) == 0:
        return (0.0,) * c, (1.0,) * c
    r = torch.arange(s)
    count = torch.zeros((), dtype=torch.float64)
    sums = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    all_sizes = images.sizes()
    for lo in range(0, len(positions), chunk):
        pos = positions[lo:lo + chunk]
        sizes = all_sizes[pos]
        mask = (r[None, :, None] < sizes[:, 0, None, None]) & (r[None, None, :] < sizes[:, 1, None, None])
        x = images.gather(pos).double().div_(255.0).mul_(mask[:, None])
        count += mask.sum()
        sums += x.sum(dim=(0, 2, 3))
        squares += x.square_().sum(dim=(0, 2, 3))
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
