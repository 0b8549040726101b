"""TrivialAugment and RandAugment on whole batches on the device (``--auto-augment``).

Both pick, per image, operations from one table of 14 (Cubuk et al. 2020; Mueller & Hutter
2021), with torchvision's magnitude spaces (``TrivialAugmentWide``, ``RandAugment``; 31 bins,
nearest-neighbour resampling, black fill):

* ``trivial``: one operation per image at a magnitude drawn uniformly from the 31 bins;
* ``rand-mM-nN``: N operations in a row per image, each at bin M of 0..30 (default
  ``rand-m9-n2``, torchvision's RandAugment defaults).

The operations and their magnitudes are drawn on the CPU for the whole epoch with the loader's
other augmentation parameters, so an epoch replays bit for bit. Per batch and per operation in
a row there is no loop over images: the batch is sorted by operation (one gather), the five
geometric operations run together as one ``affine_grid`` + ``grid_sample``, each colour
operation runs once on its slice with per-image magnitudes, and one scatter puts the images
back in order. Values stay floats in [0, 255] until the loader normalises them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggkit.errors import UsageError

GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
OPS = GEOMETRIC + ("identity", "brightness", "color", "contrast", "sharpness", "posterize",
                   "solarize", "autocontrast", "equalize")
BINS = 31
SIGNED = set(GEOMETRIC) | {"brightness", "color", "contrast", "sharpness"}


def _spaces(wide: bool, height: int, width: int) -> dict[str, float]:
    """The largest magnitude of each operation (bin 30), as torchvision defines them."""
    if wide:  # TrivialAugmentWide
        return {"shear_x": 0.99, "shear_y": 0.99, "translate_x": 32.0, "translate_y": 32.0,
                "rotate": 135.0, "brightness": 0.99, "color": 0.99, "contrast": 0.99,
                "sharpness": 0.99, "posterize": 6.0}
    return {"shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0 * width,
            "translate_y": 150.0 / 331.0 * height, "rotate": 30.0, "brightness": 0.9,
            "color": 0.9, "contrast": 0.9, "sharpness": 0.9, "posterize": 4.0}


@dataclass(frozen=True)
class Policy:
    """A parsed ``--auto-augment`` value."""

    name: str  # "trivial" | "rand"
    num_ops: int = 1
    magnitude: int | None = None  # RandAugment's bin; None: drawn per image (TrivialAugment)

    @staticmethod
    def parse(text: str) -> Policy:
        value = text.strip().lower()
        if value in ("trivial", "ta_wide", "trivialaugment"):
            return Policy("trivial")
        match = re.fullmatch(r"(?:rand|ra)((?:-[mn]\d+)*)", value)
        if not match:
            raise UsageError(f"--auto-augment {text!r}: expected 'trivial' (TrivialAugmentWide) "
                             "or 'rand[-mM][-nN]' (RandAugment, e.g. rand-m9-n2)")
        parts = dict(re.findall(r"-([mn])(\d+)", match.group(1)))
        m, n = int(parts.get("m", 9)), int(parts.get("n", 2))
        if not 0 <= m < BINS or not 1 <= n <= 8:
            raise UsageError(f"--auto-augment {text!r}: the magnitude M must be in 0..{BINS - 1} "
                             "and the number of operations N in 1..8")
        return Policy("rand", num_ops=n, magnitude=m)

    def draw(self, count: int, height: int, width: int, gen: torch.Generator
             ) -> dict[str, torch.Tensor]:
        """Per image and step in a row: the operation (CPU int64) and its signed magnitude."""
        n = self.num_ops
        ops = torch.randint(0, len(OPS), (count, n), generator=gen)
        bins = (torch.randint(0, BINS, (count, n), generator=gen) if self.magnitude is None
                else torch.full((count, n), self.magnitude, dtype=torch.int64))
        signs = torch.where(torch.rand(count, n, generator=gen) < 0.5, -1.0, 1.0)
        level = bins.to(torch.float64) / (BINS - 1)
        top = _spaces(self.name == "trivial", height, width)
        mags = torch.zeros(count, n, dtype=torch.float64)
        for k, op in enumerate(OPS):
            pick = ops == k
            if op == "posterize":  # bits kept: 8 down to 2 (TrivialAugment) or 4 (RandAugment)
                value = 8 - (bins.to(torch.float64) / ((BINS - 1) / top[op])).round()
            elif op == "solarize":  # threshold 255 down to 0
                value = 255.0 * (1 - level)
            elif op in top:
                value = level * top[op] * (signs if op in SIGNED else 1.0)
                if op.startswith("translate"):  # whole pixels, as torchvision
                    value = value.trunc()
            else:
                continue
            mags[pick] = value[pick]
        return {"aa_ops": ops, "aa_mag": mags.to(torch.float32)}


def apply(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """The batch ``x`` (uint8 or float, N C H W) with each image's operations applied in turn:
    ``ops`` (N, K) on the CPU, ``mags`` (N, K) on ``x``'s device. Returns floats in [0, 255]."""
    x = x.to(torch.float32)
    for j in range(ops.shape[1]):
        x = _one_op_each(x, ops[:, j], mags[:, j])
    return x


def _one_op_each(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(ops, stable=True)
    counts = torch.bincount(ops, minlength=len(OPS)).tolist()
    perm = order.to(x.device, non_blocking=True)
    xs, ms = x.index_select(0, perm), mags.index_select(0, perm)
    geometric = sum(counts[: len(GEOMETRIC)])
    if geometric:
        xs[:geometric] = _affine(xs[:geometric], ops[order[:geometric]], ms[:geometric])
    start = geometric
    for k in range(len(GEOMETRIC), len(OPS)):
        stop = start + counts[k]
        if stop > start and OPS[k] != "identity":
            xs[start:stop] = COLOUR_OPS[OPS[k]](xs[start:stop], ms[start:stop].view(-1, 1, 1, 1))
        start = stop
    out = torch.empty_like(xs)
    out.index_copy_(0, perm, xs)
    return out


def _affine(x: torch.Tensor, ops: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shears (about the top-left corner), translations (pixels) and rotations (degrees, about
    the center) as one inverse map per image, sampled nearest with black outside."""
    n, _, h, w = x.shape
    dev = x.device
    kind = ops.to(dev, non_blocking=True)
    a = torch.eye(2, device=dev).repeat(n, 1, 1)  # pixel coordinates: output -> input
    t = torch.zeros(n, 2, device=dev)
    is_ = {op: kind == OPS.index(op) for op in GEOMETRIC}
    a[:, 0, 1] = torch.where(is_["shear_x"], m, 0.0)
    a[:, 1, 0] = torch.where(is_["shear_y"], m, 0.0)
    t[:, 0] = torch.where(is_["translate_x"], -m, 0.0)
    t[:, 1] = torch.where(is_["translate_y"], -m, 0.0)
    angle = torch.where(is_["rotate"], m, 0.0) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    a = torch.where(is_["rotate"][:, None, None], rot, a)
    s = torch.tensor([w / 2, h / 2], device=dev)  # the center, and the pixel scale below
    t = torch.where(is_["rotate"][:, None], s - (rot @ s), t)
    # pixel p = S (u + 1) with S = diag(w/2, h/2): u_in = S^-1 A S u + S^-1 (A S 1 + t) - 1
    a_n = a * s[None, None, :] / s[None, :, None]
    t_n = (a @ s + t) / s - 1
    theta = torch.cat([a_n, t_n[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 255)


def _brightness(x, m):
    return (x * (1 + m)).clamp_(0, 255)


def _color(x, m):
    return _blend(x, _gray(x), 1 + m)


def _contrast(x, m):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + m)


def _sharpness(x, m):
    """Blend with the 3x3 smoothed image (PIL's SMOOTH kernel), border pixels left as they are."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, device=x.device, dtype=x.dtype)
    kernel[:, :, 1, 1] = 5.0
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel / 13.0, groups=c).round_()
    return _blend(x, smooth, 1 + m)


def _posterize(x, bits):
    step = 2.0 ** (8 - bits)
    return torch.floor(x.floor() / step) * step


def _solarize(x, threshold):
    return torch.where(x >= threshold, 255 - x, x)


def _autocontrast(x, _):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, 1.0, 255.0 / (high - low).clamp_min(1e-6))
    return ((x - torch.where(flat, 0.0, low)) * scale).clamp_(0, 255)


def _equalize(x, _):
    """PIL's (and torchvision's) histogram equalisation per image and channel, all at once."""
    n, c, h, w = x.shape
    v = x.round().clamp_(0, 255).to(torch.int64).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.int64)
    hist.scatter_add_(1, v, torch.ones_like(v))
    top = hist.gather(1, v.amax(1, keepdim=True))  # pixels in the last non-empty bin
    step = (h * w - top) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp_min(1)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, v), v)
    return out.view(n, c, h, w).to(x.dtype)


COLOUR_OPS = {"brightness": _brightness, "color": _color, "contrast": _contrast,
              "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize,
              "autocontrast": _autocontrast, "equalize": _equalize}
