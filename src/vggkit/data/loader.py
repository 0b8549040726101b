"""The in-memory batch loader: seeded epochs, rank shards, and whole-batch augmentation.

The dataset stays as one uint8 tensor on the training device. Per batch, the images are gathered,
augmented and normalised on that device with a handful of tensor operations and no Python loop
over images:

* random crop with padding and horizontal flip are one index computation: every output row and
  column gets the source row/column it comes from (shift, then mirror for flip, then reflect or
  clamp at the border), and two ``gather`` calls along H and W apply it; zero padding is a
  broadcast validity mask. No padded copy of the data is ever made.
* normalisation is one multiply-add with per-channel ``1 / (255 std)`` and ``-mean / std``.
* cutout is a broadcast square mask set to 0 after normalisation (the mean colour), as in
  DeVries & Taylor (2017).

All randomness (the permutation and every augmentation parameter) is drawn on the CPU from
``torch.Generator``s seeded from ``(seed, epoch)`` - and the rank for augmentation - once per
epoch, then moved to the device in one copy. An epoch is therefore bit-identical however often it
is replayed, on whatever device, which makes resuming at an epoch boundary exact.

Sharding: rank ``r`` of ``world_size`` visits ``perm[r::world_size]`` cut into batches of
``batch_size``. Every rank yields the same number of batches and, unless ``drop_last``, every
sample appears exactly once per epoch across ranks: when the final global chunk has fewer samples
than ranks, those few are folded into the previous batch (so some ranks' last batch is one
larger) instead of leaving ranks with an empty batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vggkit.errors import UsageError

PAD_MODES = ("zeros", "reflect")


@dataclass
class Augment:
    """Training-time augmentation applied to whole batches on the device."""

    crop_padding: int = 0  # random crop of the original size after padding by this many pixels (0 = off)
    pad_mode: str = "reflect"  # "zeros" | "reflect"
    flip: bool = False  # random horizontal flip, p = 0.5
    cutout: int = 0  # side of a random square set to the mean colour (0 = off)

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise UsageError(f"--pad-mode {self.pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise UsageError(f"--crop-padding {self.crop_padding}: expected a non-negative integer")
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            raise UsageError(f"--cutout {self.cutout}: expected a non-negative integer")

    @property
    def active(self) -> bool:
        """True if any augmentation is switched on."""
        return bool(self.crop_padding or self.flip or self.cutout)


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, stream); neighbouring epochs get unrelated streams."""
    state = np.random.SeedSequence([seed % (1 << 64), epoch % (1 << 64), stream]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class Loader:
    """Batches of (normalised float images, int64 labels) from an in-memory uint8 dataset."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be (N,) with N = {len(images)}, got {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
        if not 1 <= world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        n, c, h, w = images.shape
        mean_t = torch.as_tensor(list(mean), dtype=torch.float64).flatten()
        std_t = torch.as_tensor(list(std), dtype=torch.float64).flatten()
        if mean_t.numel() == 1:
            mean_t = mean_t.expand(c)
        if std_t.numel() == 1:
            std_t = std_t.expand(c)
        if mean_t.numel() != c or std_t.numel() != c or (std_t <= 0).any():
            raise ValueError(f"mean/std need {c} values with std > 0, got {list(mean)} / {list(std)}")
        self.augment = augment if augment is not None and augment.active else None
        if self.augment is not None and self.augment.pad_mode == "reflect" and self.augment.crop_padding >= min(h, w):
            raise UsageError(
                f"--crop-padding {self.augment.crop_padding}: reflect padding needs less than the image size ({h}x{w})"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.dtype = dtype
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        # Moved once; uint8 keeps the resident copy 4x smaller than float. Batches are built in
        # NCHW even for channels_last output: CPU kernels that broadcast over a size-3 innermost
        # channel dim are 10-20x slower, so one layout copy at the end is the cheapest route.
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        # Normalisation as one multiply-add: (x / 255 - mean) / std = x * scale + shift.
        self._scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)
        self._plane_offsets = torch.arange(c, device=self.device) * h  # row offset of each channel plane
        self._n = n
        self._num_batches, self._total = self._plan(n)

    def _plan(self, n: int) -> tuple[int, int]:
        """(batches per rank, samples used per epoch across all ranks)."""
        b, ws = self.batch_size, self.world_size
        if self.drop_last:
            nb = n // (b * ws)
            if nb == 0:
                raise UsageError(
                    f"--batch-size {b}: with {ws} rank(s) and drop_last, a batch needs {b * ws:,} samples "
                    f"but the split has {n:,}"
                )
            return nb, nb * b * ws
        if n == 0:
            raise UsageError("cannot make batches from an empty split")
        if n < ws:
            raise UsageError(f"{n} sample(s) cannot be shared among {ws} ranks without empty batches")
        nb = -(-n // (b * ws))
        last_chunk = n - (nb - 1) * b * ws
        if last_chunk < 2 * ws and nb > 1:
            # Fold the few leftovers into the previous batch rather than leave a rank with
            # an empty batch or a batch of one (BatchNorm cannot train on a single sample).
            nb -= 1
        return nb, n

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self._num_batches

    def num_samples(self) -> int:
        """Samples this rank visits per epoch."""
        return len(range(self.rank, self._total, self.world_size))

    def indices(self, epoch: int) -> torch.Tensor:
        """The sample indices (CPU int64) this rank visits in ``epoch``, in order."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 0))
            order = torch.randperm(self._n, generator=gen)
        else:
            order = torch.arange(self._n)
        return order[: self._total][self.rank :: self.world_size].clone()

    def _bounds(self, count: int) -> list[tuple[int, int]]:
        """Batch boundaries over this rank's ``count`` samples: full batches, the remainder last."""
        b, nb = self.batch_size, self._num_batches
        return [(i * b, (i + 1) * b if i < nb - 1 else count) for i in range(nb)]

    def _draw(self, count: int, epoch: int) -> dict[str, torch.Tensor]:
        """This rank's augmentation parameters for the whole epoch, drawn on the CPU, moved at once."""
        aug = self.augment
        assert aug is not None
        h, w = self.images.shape[2:]
        gen = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 1 + self.rank))
        params: dict[str, torch.Tensor] = {}
        if aug.crop_padding:
            span = 2 * aug.crop_padding + 1
            params["dy"] = torch.randint(0, span, (count,), generator=gen) - aug.crop_padding
            params["dx"] = torch.randint(0, span, (count,), generator=gen) - aug.crop_padding
        if aug.flip:
            params["flip"] = torch.randint(0, 2, (count,), generator=gen).bool()
        if aug.cutout:
            params["cy"] = torch.randint(0, h, (count,), generator=gen) - aug.cutout // 2
            params["cx"] = torch.randint(0, w, (count,), generator=gen) - aug.cutout // 2
        return {k: v.to(self.device, non_blocking=True) for k, v in params.items()}

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's batches for ``epoch``: (images in ``dtype`` on the device, int64 labels).

        ``start`` skips the first batches without building them (resuming mid-epoch); the batches
        that follow are identical to those of a full pass.
        """
        order = self.indices(epoch)
        params = self._draw(len(order), epoch) if self.augment is not None else {}
        order = order.to(self.device, non_blocking=True)
        for lo, hi in self._bounds(len(order))[start:]:
            idx = order[lo:hi]
            p = {k: v[lo:hi] for k, v in params.items()}
            yield self._normalise(self._gather(idx, p), p), self.labels.index_select(0, idx)

    def _gather(self, idx: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's uint8 NCHW images, randomly cropped and flipped: at most two gathers."""
        aug = self.augment
        n, c, h, w = self.images.shape
        b = len(idx)
        if aug is None or not (aug.crop_padding or aug.flip):
            return self.images.index_select(0, idx)
        valid: torch.Tensor | None = None
        # Source column of each output column: mirror first (flip of the crop), then shift.
        cols = self._cols.expand(b, w)
        if aug.flip:
            cols = torch.where(p["flip"][:, None], (w - 1) - cols, cols)
        if aug.crop_padding:
            rows = self._rows[None, :] + p["dy"][:, None]
            cols = cols + p["dx"][:, None]
            if aug.pad_mode == "reflect":
                # Mirror without repeating the edge pixel (torch's 'reflect'): valid for |shift| < size.
                rows = (h - 1) - ((h - 1) - rows.abs()).abs()
                cols = (w - 1) - ((w - 1) - cols.abs()).abs()
            else:
                valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])[:, None]
                rows = rows.clamp(0, h - 1)
                cols = cols.clamp(0, w - 1)
            # Batch gather and row crop in one: whole W-pixel rows out of an (N*C*H, W) view.
            src = (idx[:, None, None] * (c * h) + self._plane_offsets[None, :, None] + rows[:, None, :]).reshape(-1)
            x = self.images.view(n * c * h, w).index_select(0, src).view(b, c, h, w)
        else:
            x = self.images.index_select(0, idx)
        x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        if valid is not None:
            x.mul_(valid)  # zero padding: pixels that came from outside the image are black
        return x

    def _normalise(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 NCHW batch -> normalised float batch, cutout, then the requested layout and dtype."""
        out = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        aug = self.augment
        if aug is not None and aug.cutout:
            s = aug.cutout
            in_y = (self._rows[None, :] >= p["cy"][:, None]) & (self._rows[None, :] < p["cy"][:, None] + s)
            in_x = (self._cols[None, :] >= p["cx"][:, None]) & (self._cols[None, :] < p["cx"][:, None] + s)
            # A broadcast multiply by the keep-mask is far faster on CPU than a broadcast masked_fill_.
            out.mul_(~(in_y[:, :, None] & in_x[:, None, :])[:, None])
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
