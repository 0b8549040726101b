"""The in-memory Loader: determinism, sharding, normalisation and batch augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vggkit.data import Augment, Loader
from vggkit.errors import UsageError

IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1 / 255] * 3}  # normalisation that leaves pixel values as they are


def _images(n: int = 40, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _reference(x: torch.Tensor, p: dict[str, torch.Tensor], aug: Augment) -> torch.Tensor:
    """Per-image augmentation the slow, obvious way (pad, slice, flip, cutout)."""
    out = []
    h, w = x.shape[2:]
    for i in range(len(x)):
        img = x[i].float()
        if aug.crop_padding:
            k = aug.crop_padding
            mode = "reflect" if aug.pad_mode == "reflect" else "constant"
            padded = F.pad(img[None], (k, k, k, k), mode=mode)[0]
            dy, dx = int(p["dy"][i]) + k, int(p["dx"][i]) + k
            img = padded[:, dy : dy + h, dx : dx + w]
        if aug.flip and bool(p["flip"][i]):
            img = img.flip(-1)
        if aug.cutout:
            cy, cx, s = int(p["cy"][i]), int(p["cx"][i]), aug.cutout
            img = img.clone()
            img[:, max(cy, 0) : max(cy + s, 0), max(cx, 0) : max(cx + s, 0)] = 0
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("aug", [
    Augment(crop_padding=2, pad_mode="reflect"),
    Augment(crop_padding=3, pad_mode="zeros"),
    Augment(flip=True),
    Augment(cutout=4),
    Augment(crop_padding=4, pad_mode="reflect", flip=True, cutout=3),
    Augment(crop_padding=7, pad_mode="reflect", flip=True),
    Augment(crop_padding=10, pad_mode="zeros", flip=True, cutout=20),
], ids=lambda a: f"crop{a.crop_padding}-{a.pad_mode}-flip{int(a.flip)}-cut{a.cutout}")
def test_augmentation_matches_per_image_reference(aug: Augment) -> None:
    x = _images(n=37, h=8, w=9)
    loader = Loader(x, torch.zeros(37, dtype=torch.int64), 16, shuffle=True, seed=3, augment=aug, **IDENTITY)
    order = loader.indices(2)
    params = loader._draw(order, 2)
    got = torch.cat([b for b, _ in loader.epoch(2)])
    want = _reference(x[order], params, aug)
    assert torch.equal(got, want)
    if aug.flip:
        assert 0 < int(params["flip"].sum()) < len(order)
    if aug.crop_padding:
        assert int(params["dy"].min()) >= -aug.crop_padding and int(params["dy"].max()) <= aug.crop_padding
        assert len(set(params["dx"].tolist())) > 1


def test_cutout_is_mean_colour_after_normalisation() -> None:
    x = torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    loader = Loader(x, torch.zeros(4, dtype=torch.int64), 4, shuffle=False, mean=[0.2, 0.4, 0.6], std=[0.1, 0.2, 0.3],
                    augment=Augment(cutout=4))
    (batch, _), = loader.epoch(0)
    zeros = (batch == 0).all(dim=1)
    assert (zeros.sum(dim=(1, 2)) >= 4).all() and (zeros.sum(dim=(1, 2)) <= 16).all()
    assert torch.allclose(batch[:, 0][~zeros], torch.tensor((200 / 255 - 0.2) / 0.1))


def test_normalisation_and_eval_order() -> None:
    x = _images(n=10)
    y = torch.arange(10)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    loader = Loader(x, y, 4, shuffle=False, mean=mean, std=std)
    batches = list(loader.epoch(0))
    assert [len(b) for b, _ in batches] == [4, 4, 2] and len(loader) == 3
    got = torch.cat([b for b, _ in batches])
    want = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
    assert torch.equal(torch.cat([l for _, l in batches]), y)


def test_labels_follow_images_under_augmentation() -> None:
    n = 50
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 6, 6).contiguous()
    loader = Loader(x, torch.arange(n), 8, shuffle=True, seed=1,
                    augment=Augment(crop_padding=2, pad_mode="reflect", flip=True), **IDENTITY)
    for images, labels in loader.epoch(0):
        assert torch.equal(images[:, 0, 0, 0].long(), labels)
        assert (images == images[:, :1, :1, :1]).all()


def test_epochs_are_reproducible_and_distinct() -> None:
    x = _images(n=64)
    aug = Augment(crop_padding=2, flip=True, cutout=2)
    kw = dict(shuffle=True, seed=11, augment=aug, mean=[0.5] * 3, std=[0.25] * 3)
    a = Loader(x, torch.arange(64), 16, **kw)
    b = Loader(x, torch.arange(64), 16, **kw)  # a "resumed" run: fresh object, jumps to epoch 3
    seq = [list(a.epoch(e)) for e in range(4)]
    resumed = list(b.epoch(3))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(seq[3], resumed))
    assert not torch.equal(seq[0][0][1], seq[1][0][1]), "each epoch has its own permutation"
    other = Loader(x, torch.arange(64), 16, **{**kw, "seed": 12})
    assert not torch.equal(next(iter(other.epoch(0)))[1], seq[0][0][1])


@pytest.mark.parametrize("n,bs,ws", list(itertools.product([1, 5, 7, 16, 33], [1, 2, 3, 8], [1, 2, 3, 4])))
def test_shards_cover_every_sample_once(n: int, bs: int, ws: int) -> None:
    x, y = _images(n=n, h=2, w=2), torch.arange(n)
    if n < ws:
        with pytest.raises(UsageError):
            Loader(x, y, bs, shuffle=True, mean=[0] * 3, std=[1] * 3, world_size=ws)
        return
    loaders = [Loader(x, y, bs, shuffle=True, seed=4, mean=[0] * 3, std=[1] * 3, rank=r, world_size=ws) for r in range(ws)]
    seen = []
    counts = set()
    for ld in loaders:
        batches = [lab for _, lab in ld.epoch(1)]
        counts.add(len(batches))
        assert len(batches) == len(ld)
        # a remainder that would leave a rank one sample (or none) is folded into the batch before
        assert all(len(b) >= 1 for b in batches) and all(len(b) <= bs + 2 for b in batches)
        flat = torch.cat(batches)
        assert torch.equal(flat, ld.indices(1)) and len(flat) == ld.num_samples()
        seen.append(flat)
    assert len(counts) == 1, "every rank yields the same number of batches"
    assert sorted(torch.cat(seen).tolist()) == list(range(n)), "each sample exactly once per epoch"
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))


@pytest.mark.parametrize("n,bs,ws", [(33, 4, 2), (100, 8, 3), (16, 8, 2)])
def test_drop_last_full_batches_only(n: int, bs: int, ws: int) -> None:
    x, y = _images(n=n, h=2, w=2), torch.arange(n)
    loaders = [Loader(x, y, bs, shuffle=True, mean=[0] * 3, std=[1] * 3, rank=r, world_size=ws, drop_last=True)
               for r in range(ws)]
    all_idx = []
    for ld in loaders:
        sizes = [len(lab) for _, lab in ld.epoch(0)]
        assert sizes == [bs] * (n // (bs * ws))
        all_idx += ld.indices(0).tolist()
    assert len(all_idx) == len(set(all_idx)) == (n // (bs * ws)) * bs * ws


def test_shards_follow_rank_stride() -> None:
    x, y = _images(n=20, h=2, w=2), torch.arange(20)
    full = Loader(x, y, 4, shuffle=True, seed=9, mean=[0] * 3, std=[1] * 3).indices(5)
    part = Loader(x, y, 4, shuffle=True, seed=9, mean=[0] * 3, std=[1] * 3, rank=1, world_size=3).indices(5)
    assert torch.equal(part, full[1::3])


def test_memory_format_and_dtype() -> None:
    x = _images(n=6)
    loader = Loader(x, torch.arange(6), 3, shuffle=True, mean=[0.5] * 3, std=[0.5] * 3, channels_last=True,
                    dtype=torch.bfloat16, augment=Augment(crop_padding=1, flip=True))
    for images, labels in loader.epoch(0):
        assert images.dtype == torch.bfloat16 and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
    assert loader.images.dtype == torch.uint8, "the resident copy stays uint8"


def test_single_mean_broadcasts_to_channels() -> None:
    loader = Loader(_images(n=2), torch.arange(2), 2, shuffle=False, mean=[0.5], std=[0.5])
    (b, _), = loader.epoch(0)
    assert b.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("kwargs,flag", [
    ({"pad_mode": "wrap"}, "--pad-mode"), ({"crop_padding": -1}, "--crop-padding"), ({"cutout": -2}, "--cutout"),
])
def test_augment_validation(kwargs: dict, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        Augment(**kwargs)


def test_loader_validation() -> None:
    x, y = _images(n=8), torch.arange(8)
    with pytest.raises(UsageError, match="--crop-padding 8: reflect padding"):
        Loader(x, y, 4, shuffle=True, mean=[0] * 3, std=[1] * 3, augment=Augment(crop_padding=8))
    with pytest.raises(UsageError, match="--batch-size 0"):
        Loader(x, y, 0, shuffle=True, mean=[0] * 3, std=[1] * 3)
    with pytest.raises(UsageError, match="--batch-size 16"):
        Loader(x, y, 16, shuffle=True, mean=[0] * 3, std=[1] * 3, drop_last=True)
    with pytest.raises(ValueError, match="mean/std"):
        Loader(x, y, 4, shuffle=True, mean=[0, 0], std=[1, 1])
    # Zero padding may exceed the image: the crop can then be mostly black, which is allowed.
    Loader(x, y, 4, shuffle=True, mean=[0] * 3, std=[1] * 3, augment=Augment(crop_padding=8, pad_mode="zeros"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _images(n=40)
    kw = dict(shuffle=True, seed=2, augment=Augment(crop_padding=2, flip=True, cutout=3), mean=[0.5] * 3, std=[0.2] * 3)
    cpu = list(Loader(x, torch.arange(40), 16, **kw).epoch(1))
    gpu = list(Loader(x, torch.arange(40), 16, device="cuda", **kw).epoch(1))
    assert gpu[0][0].device.type == "cuda"
    for (a, la), (b, lb) in zip(cpu, gpu):
        assert torch.equal(la, lb.cpu()) and torch.allclose(a, b.cpu(), atol=1e-6)


def test_epoch_start_skips_batches_identically() -> None:
    x = _images(n=50)
    loader = Loader(x, torch.arange(50), 8, shuffle=True, seed=3, mean=[0.5] * 3, std=[0.5] * 3,
                    augment=Augment(crop_padding=2, flip=True, cutout=3))
    full = list(loader.epoch(4))
    tail = list(loader.epoch(4, start=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
