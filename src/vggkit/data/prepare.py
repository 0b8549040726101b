"""Whole-array preparation of uint8 image tensors: resize, channel conversion, statistics.

All operations work on (N, C, H, W) uint8 tensors in chunks (bounded float memory), vectorised
over the chunk: no Python loop over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vggkit.errors import UsageError

_CHUNK = 4096  # images per float chunk: ~50 MB at 3x32x32 -> 64x64
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 to (N, C, size, size) with antialiased bilinear interpolation."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for lo in range(0, images.shape[0], _CHUNK):
        chunk = images[lo : lo + _CHUNK].float()
        # antialias=True low-pass filters when shrinking; it is a no-op when enlarging.
        out[lo : lo + _CHUNK] = _to_uint8(F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return out


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """1 -> 3 repeats the plane; 3 -> 1 takes ITU-R 601 luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
        for lo in range(0, images.shape[0], _CHUNK):
            chunk = images[lo : lo + _CHUNK].float()
            out[lo : lo + _CHUNK] = _to_uint8((chunk * weights).sum(dim=1, keepdim=True))
        return out
    raise UsageError(f"--channels {channels}: cannot convert images with {have} channels")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and much faster than float sums.
    """
    c = images.shape[1]
    if images.shape[0] == 0:
        return (0.0,) * c, (1.0,) * c
    hist = torch.stack([torch.bincount(images[:, i].reshape(-1), minlength=256) for i in range(c)]).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / n
    var = ((hist * values * values).sum(dim=1) / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    # A constant channel would divide by zero when normalising.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
