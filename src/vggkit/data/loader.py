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

Placement: the dataset is put on the training device whole when it fits there with room to
spare (``placement="device"``; a memory-mapped photo cache is then read into memory once);
otherwise (``"stream"``) it stays on the host - a memory-mapped cache stays on disk - and a
background thread gathers each batch, copies it to the device and builds it ahead of the step,
so reading overlaps the compute. Both give bit-identical batches.

Photos (``photo=PhotoCrop``): the images are canvases holding each photo at its own aspect
ratio; the crop (random resized for training, resize + center crop for evaluation) is taken
from each canvas per batch, with its parameters drawn for the whole epoch like the others.

Sharding: rank ``r`` of ``world_size`` visits ``perm[r::world_size]`` cut into batches of
``batch_size``. Every rank yields the same number of batches and, unless ``drop_last``, every
sample appears exactly once per epoch across ranks: when the final global chunk has fewer samples
than ranks, those few are folded into the previous batch (so some ranks' last batch is one
larger) instead of leaving ranks with an empty batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vggkit.data import autoaugment
from vggkit.data.autoaugment import Policy
from vggkit.data.store import MappedImages
from vggkit.errors import UsageError

log = logging.getLogger("vggkit.data")

PAD_MODES = ("zeros", "reflect")
PLACEMENTS = ("auto", "device", "stream")
HOST_PARAMS = ("boxes", "aa_ops")  # augmentation parameters read on the CPU
PREFETCH_BATCHES = 2  # built ahead of the step when streaming
DEVICE_SHARE = 0.25  # "fits with room to spare": at most this share of the free memory


@dataclass
class Augment:
    """Training-time augmentation applied to whole batches on the device."""

    crop_padding: int = 0  # random crop of the original size after padding by this many pixels (0 = off)
    pad_mode: str = "reflect"  # "zeros" | "reflect"
    flip: bool = False  # random horizontal flip, p = 0.5
    cutout: int = 0  # side of a random square set to the mean colour (0 = off)
    auto_augment: str = ""  # "trivial" | "rand-mM-nN" (data/autoaugment.py), "" = off

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise UsageError(f"--pad-mode {self.pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise UsageError(f"--crop-padding {self.crop_padding}: expected a non-negative integer")
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            raise UsageError(f"--cutout {self.cutout}: expected a non-negative integer")
        self.policy = Policy.parse(self.auto_augment) if self.auto_augment else None

    @property
    def active(self) -> bool:
        """True if any augmentation is switched on."""
        return bool(self.crop_padding or self.flip or self.cutout or self.auto_augment)


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, stream); neighbouring epochs get unrelated streams."""
    state = np.random.SeedSequence([seed % (1 << 64), epoch % (1 << 64), stream]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def _normaliser(mean: Sequence[float], std: Sequence[float], c: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with x * scale + shift = (x / 255 - mean) / std."""
    mean_t = torch.as_tensor(list(mean), dtype=torch.float64).flatten()
    std_t = torch.as_tensor(list(std), dtype=torch.float64).flatten()
    if mean_t.numel() == 1:
        mean_t = mean_t.expand(c)
    if std_t.numel() == 1:
        std_t = std_t.expand(c)
    if mean_t.numel() != c or std_t.numel() != c or (std_t <= 0).any():
        raise ValueError(f"mean/std need {c} values with std > 0, got {list(mean)} / {list(std)}")
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, c, 1, 1).to(device)
    return scale, (-mean_t / std_t).to(torch.float32).view(1, c, 1, 1).to(device)


def free_memory(device: torch.device) -> int:
    """Bytes free for data on ``device``: the GPU's free memory, or for the CPU what the
    kernel calls available, capped by this process's cgroup memory limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = cgroup_memory_left()
    candidates = [v for v in (free, limit) if v is not None]
    return min(candidates) if candidates else 1 << 62


def cgroup_memory_left() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), None when unlimited."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = f"/sys/fs/cgroup{path}", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = f"/sys/fs/cgroup/memory{path}", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit = open(f"{base}/{files[0]}").read().strip()
            usage = int(open(f"{base}/{files[1]}").read())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def choose_placement(nbytes: int, device: torch.device, requested: str = "auto") -> str:
    """"device" when the whole dataset fits on the training device with room to spare
    (at most DEVICE_SHARE of its free memory: the step's activations need the rest), else
    "stream". An explicit request is kept."""
    if requested != "auto":
        return requested
    return "device" if nbytes <= DEVICE_SHARE * free_memory(device) else "stream"


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
        photo: Any = None,
        placement: str = "auto",
        balanced: bool = False,
    ) -> None:
        if not isinstance(images, MappedImages) and (images.dtype != torch.uint8 or images.dim() != 4):
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if placement not in PLACEMENTS:
            raise UsageError(f"--data-placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be (N,) with N = {len(images)}, got {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
        if not 1 <= world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        n, c, h, w = images.shape
        self.augment = augment if augment is not None and augment.active else None
        if photo is not None:
            # The photo crop decides the geometry (and flips); cutout and --auto-augment follow it.
            self.augment = (Augment(cutout=augment.cutout, auto_augment=augment.auto_augment)
                            if augment is not None and (augment.cutout or augment.auto_augment)
                            else None)
            h = w = photo.size
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
        self.photo = photo
        self.sizes = None
        if photo is not None:
            self.sizes = images.sizes() if isinstance(images, MappedImages) else \
                torch.tensor([list(images.shape[2:])]).expand(n, 2)
        self.nbytes = int(np.prod(images.shape))
        self.placement = choose_placement(self.nbytes, self.device, placement)
        # Moved once; uint8 keeps the resident copy 4x smaller than float. Batches are built in
        # NCHW even for channels_last output: CPU kernels that broadcast over a size-3 innermost
        # channel dim are 10-20x slower, so one layout copy at the end is the cheapest route.
        if self.placement == "device":
            resident = images.load() if isinstance(images, MappedImages) else images
            self.images = resident.to(self.device).contiguous()
        else:
            self.images = images  # a host tensor or the memory-mapped cache: gathered per batch
        self.labels = labels.to(self.device, torch.int64)
        self._scale, self._shift = _normaliser(mean, std, c, self.device)
        self._rows = torch.arange(h, device=self.device)  # of the output batch
        self._cols = torch.arange(w, device=self.device)
        self._n = n
        self._num_batches, self._total = self._plan(n)
        # --balanced-sampling: each class's members, for an epoch order that draws them evenly
        host_labels = labels.cpu()
        self._by_class = ([torch.nonzero(host_labels == c).flatten() for c in host_labels.unique()]
                          if balanced and shuffle else None)

    def describe(self) -> str:
        """Where the data lives, in a few words, for the run's log."""
        size = f"{self.nbytes / 1e6:,.1f} MB" if self.nbytes < 1e9 else f"{self.nbytes / 1e9:,.2f} GB"
        source = "memory-mapped cache" if isinstance(self.images, MappedImages) else "host memory"
        if self.placement == "device":
            where = "memory" if self.device.type == "cpu" else f"{self.device} memory"
            return f"{self._n:,} images, {size} decoded: held in {where}"
        return (f"{self._n:,} images, {size} decoded: streamed from the {source}, "
                f"{PREFETCH_BATCHES} batches built ahead of the step")

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
            order = (balanced_order(self._by_class, self._n, gen) if self._by_class is not None
                     else torch.randperm(self._n, generator=gen))
        else:
            order = torch.arange(self._n)
        return order[: self._total][self.rank :: self.world_size].clone()

    def _bounds(self, count: int) -> list[tuple[int, int]]:
        """Batch boundaries over this rank's ``count`` samples: full batches, the remainder last."""
        b, nb = self.batch_size, self._num_batches
        return [(i * b, (i + 1) * b if i < nb - 1 else count) for i in range(nb)]

    def _draw(self, order: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """This rank's augmentation parameters for the whole epoch, drawn on the CPU, moved at once."""
        aug, count = self.augment, len(order)
        h, w = len(self._rows), len(self._cols)
        gen = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 1 + self.rank))
        params: dict[str, torch.Tensor] = {}
        if self.photo is not None:
            params.update(self.photo.params(self.sizes[order], gen))
        if aug is not None and aug.crop_padding:
            span = 2 * aug.crop_padding + 1
            params["dy"] = torch.randint(0, span, (count,), generator=gen) - aug.crop_padding
            params["dx"] = torch.randint(0, span, (count,), generator=gen) - aug.crop_padding
        if aug is not None and aug.flip:
            params["flip"] = torch.randint(0, 2, (count,), generator=gen).bool()
        if aug is not None and aug.cutout:
            params["cy"] = torch.randint(0, h, (count,), generator=gen) - aug.cutout // 2
            params["cx"] = torch.randint(0, w, (count,), generator=gen) - aug.cutout // 2
        if aug is not None and aug.policy is not None:  # drawn last: the draws above stay as they were
            params.update(aug.policy.draw(count, h, w, gen))
        # Photo boxes and the operations' grouping stay on the CPU: read there without a device sync.
        return {k: v if k in HOST_PARAMS else v.to(self.device, non_blocking=True)
                for k, v in params.items()}

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's batches for ``epoch``: (images in ``dtype`` on the device, int64 labels).

        ``start`` skips the first batches without building them (resuming mid-epoch); the batches
        that follow are identical to those of a full pass.
        """
        order = self.indices(epoch)
        drawn = self.augment is not None or self.photo is not None
        params = self._draw(order, epoch) if drawn else {}
        host_order = order
        order = order.to(self.device, non_blocking=True)
        bounds = self._bounds(len(order))[start:]

        def build(bound: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            lo, hi = bound
            idx = order[lo:hi]
            p = {k: v[lo:hi] for k, v in params.items()}
            if self.placement == "device":
                x = self._resident_batch(idx, p)
            else:
                x = self._streamed_batch(host_order[lo:hi], p)
            if "aa_ops" in p:
                x = autoaugment.apply(x, p["aa_ops"], p["aa_mag"])
            return self._normalise(x, p), self.labels.index_select(0, idx)

        if self.placement == "device":
            yield from map(build, bounds)
        else:
            yield from prefetched(build, bounds, PREFETCH_BATCHES)

    def _resident_batch(self, idx: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.photo is not None:
            return self.photo.apply(self.images.index_select(0, idx), p)
        return self._gather(self.images, idx, p)

    def _streamed_batch(self, host_idx: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gather the batch on the host (reading the memory map), copy it to the device, crop."""
        if isinstance(self.images, MappedImages):
            x = self.images.gather(host_idx)
        else:
            x = self.images.index_select(0, host_idx)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if self.photo is not None:
            return self.photo.apply(x, p)
        return self._gather(x, torch.arange(len(x), device=self.device), p)

    def _gather(self, images: torch.Tensor, idx: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch ``idx`` of ``images`` as uint8 NCHW, randomly cropped and flipped: at most two gathers."""
        aug = self.augment
        n, c, h, w = images.shape
        b = len(idx)
        if aug is None or not (aug.crop_padding or aug.flip):
            return images.index_select(0, idx)
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
            planes = torch.arange(c, device=idx.device) * h  # row offset of each channel plane
            src = (idx[:, None, None] * (c * h) + planes[None, :, None] + rows[:, None, :]).reshape(-1)
            x = images.view(n * c * h, w).index_select(0, src).view(b, c, h, w)
        else:
            x = images.index_select(0, idx)
        x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        if valid is not None:
            x.mul_(valid)  # zero padding: pixels that came from outside the image are black
        return x

    def _normalise(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (or --auto-augment's float 0-255) NCHW batch -> normalised float batch, cutout, then the requested layout and dtype."""
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


_END = object()


def balanced_order(by_class: list[torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` indices that hold every class ``n // K`` times (a seeded ``n % K`` of them once
    more), shuffled: each class's members in fresh permutations, as many as its share needs,
    so a small class's images recur evenly and a large class is subsampled without repeats.
    Like PyTorch's WeightedRandomSampler with inverse-frequency weights, but with exact
    shares and no image drawn twice before every image of its class was drawn once."""
    k = len(by_class)
    shares = torch.full((k,), n // k, dtype=torch.int64)
    shares[torch.randperm(k, generator=gen)[: n % k]] += 1
    parts = []
    for members, share in zip(by_class, shares.tolist()):
        rounds = -(-share // len(members))
        drawn = [members[torch.randperm(len(members), generator=gen)] for _ in range(rounds)]
        parts.append(torch.cat(drawn)[:share])
    order = torch.cat(parts)
    return order[torch.randperm(n, generator=gen)]


def prefetched(build: Callable[[Any], Any], items: Sequence[Any], depth: int) -> Iterator[Any]:
    """``map(build, items)``, computed by a background thread up to ``depth`` items ahead.

    The thread's torch work (gathers, copies, crops) releases the GIL, so it overlaps the
    training step. An error in the thread is raised here; leaving the loop early (a resume,
    an interrupt) stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("ok", build(item))):
                    return
            put(("end", _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=work, name="vggkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=10)
