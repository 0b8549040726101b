"""Photo crops on whole batches: random resized crop for training, resize + center crop for evaluation.

The decoded-photo cache keeps each photo at its own aspect ratio at the top-left of an S x S
uint8 canvas, with its true (height, width) beside it. The two ImageNet-style transforms are
expressed as one box per image in source pixels, then sampled from the canvases in one go:

* training: torchvision's ``RandomResizedCrop`` - a box of U(scale) x the image's area with an
  aspect ratio log-uniform in ``ratio`` at a uniform position (up to ``attempts`` tries, else a
  central crop with the ratio clamped), resized to ``size`` and mirrored with p = 0.5;
* evaluation / prediction: "resize the shorter side to size / crop_pct, then center crop
  size x size" is the centered square of side ``crop_pct x shorter side``, resized to ``size``.

Why batched: a Python loop of per-image crop + resize costs one kernel launch per image and per
op; here the boxes of a whole epoch are drawn on the CPU at once (a fixed number of random
numbers per image, so an epoch replays bit-identically from its seed, like the loader's other
augmentation parameters), and a batch is resampled with one ``affine_grid`` + ``grid_sample``
on whatever device holds it.

Sampling details: each box's pixel edges map exactly onto the output's. Bilinear taps near a
box edge would reach the neighbouring pixel, which for a box at the image's edge is the canvas
padding beyond the photo; so every image is first clamped to its box (pixels outside it repeat
the box's edge pixel, two uint8 gathers) and sampled with ``padding_mode="border"``: the taps
never read outside the box, as in torchvision's crop-then-resize. The sampling runs in float64:
float32 normalised coordinates carry ~S x 1e-7 px of error, enough to turn a pixel-exact crop
into a faint blend of neighbours; in float64 the residue is ~1e-12, rounded away before the cast
back to float32, so pixel-aligned crops (a whole image at its own size) come out exact.
``grid_sample`` does not antialias when it shrinks: the stored side is kept close to the crop, so
full-image crops shrink by at most ~1.5x; when every box of a batch is at least k >= 2 times the
output, the batch is first average-pooled by k (a cheap box-filter antialias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggkit.errors import UsageError

EDGE_TOLERANCE = 1e-3  # box edges this close to a pixel edge count as on it (float rounding)
SNAP = float(2**24)  # float32 results are rounded to multiples of 1 / SNAP


def _check_sizes(hw: torch.Tensor) -> torch.Tensor:
    """``hw`` as a CPU float64 (N, 2) tensor of positive sizes."""
    hw = torch.as_tensor(hw).to("cpu", torch.float64)
    if hw.dim() != 2 or hw.shape[1] != 2 or (hw < 1).any():
        raise ValueError(f"hw must be (N, 2) positive (height, width) sizes, got {tuple(hw.shape)}")
    return hw


def random_resized_boxes(hw: torch.Tensor, generator: torch.Generator, scale: Sequence[float] = (0.08, 1.0),
                         ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """(N, 4) float32 (top, left, height, width) boxes: ``RandomResizedCrop.get_params``, vectorised.

    Every image draws ``2 * attempts + 2`` uniforms whatever the outcome, so the boxes are a pure
    function of (generator state, N). Boxes are integer-aligned and inside each (h, w).
    """
    hw = _check_sizes(hw)
    h, w = hw[:, :1], hw[:, 1:]
    u = torch.rand((len(hw), 2 * attempts + 2), generator=generator, dtype=torch.float64)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, attempts:2 * attempts])
    cw = torch.round(torch.sqrt(area * aspect))  # round half to even, like Python's round()
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1, keepdim=True)
    fh, fw = _fallback_size(h, w, ratio)
    ch = torch.where(found, ch.gather(1, first), fh)
    cw = torch.where(found, cw.gather(1, first), fw)
    # randint(0, n + 1) as floor(u * (n + 1)); the clamp guards the u -> 1 rounding edge.
    top = torch.minimum(torch.floor(u[:, -2:-1] * (h - ch + 1)), h - ch)
    left = torch.minimum(torch.floor(u[:, -1:] * (w - cw + 1)), w - cw)
    top = torch.where(found, top, torch.floor((h - ch) / 2))
    left = torch.where(found, left, torch.floor((w - cw) / 2))
    return torch.cat([top, left, ch, cw], 1).to(torch.float32)


def _fallback_size(h: torch.Tensor, w: torch.Tensor, ratio: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = w / h
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h).clamp(1)
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w).clamp(1)
    return torch.minimum(fh, h), torch.minimum(fw, w)


def center_boxes(hw: torch.Tensor, crop_pct: float = 0.875) -> torch.Tensor:
    """(N, 4) float32 boxes of "resize shorter side to crop / crop_pct, center crop crop x crop":
    the centered square of side ``crop_pct x min(h, w)`` in source pixels."""
    hw = _check_sizes(hw)
    side = hw.min(1, keepdim=True).values * crop_pct
    corner = (hw - side) / 2
    return torch.cat([corner, side, side], 1).to(torch.float32)


def resample(canvas: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
             *, antialias: bool = True) -> torch.Tensor:
    """Each box of ``canvas`` (B, C, H, W) resampled (bilinear) to ``size`` x ``size``, mirrored
    where ``flip``; float32 values in the canvas's range (float64 for a float64 canvas).

    ``grid_sample`` does not antialias a shrink; with ``antialias`` the batch is average-pooled
    by k first when every box is at least k >= 2 times ``size``. Boxes on the CPU spare a device
    sync for that decision; they are copied to the canvas's device once.
    """
    b, c = canvas.shape[:2]
    boxes = boxes.to(torch.float64)
    k = _pool_factor(boxes, size) if antialias and b else 1
    boxes = boxes.to(canvas.device)
    x = _clamp_to_boxes(canvas, boxes)
    if k > 1:
        x = F.avg_pool2d(x.to(torch.float32), k, ceil_mode=True)  # the last block averages what it has
        boxes = boxes / k
    x = x.to(torch.float64)
    theta = _theta(boxes, x.shape[2], x.shape[3], flip)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if canvas.dtype == torch.float64:
        return out
    # Snap away the ~1e-12 residue of coordinate rounding (else a 0 pixel next to a 255 one
    # comes out as 1e-12, not 0): a 2**-24 step is below float32's resolution above 0.5.
    return out.mul_(SNAP).round_().div_(SNAP).to(torch.float32)


def _pool_factor(boxes: torch.Tensor, size: int) -> int:
    """The largest integer k with every box at least k x ``size`` on both sides (1 if none)."""
    return max(1, int(boxes[:, 2:].min().item() // size))


def _span(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) index of the pixel each of n rows (or columns) reads: itself, clamped to the box's pixels."""
    first = torch.floor(start + EDGE_TOLERANCE).clamp(0, n - 1)
    last = (torch.ceil(start + length - EDGE_TOLERANCE) - 1).clamp(0, n - 1)
    last = torch.maximum(first, last)
    line = torch.arange(n, device=start.device, dtype=torch.float64)
    return torch.minimum(torch.maximum(line, first[:, None]), last[:, None]).long()


def _clamp_to_boxes(canvas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The canvases with every pixel outside each box replaced by the box's nearest edge pixel."""
    b, c, h, w = canvas.shape
    rows = _span(boxes[:, 0], boxes[:, 2], h)
    cols = _span(boxes[:, 1], boxes[:, 3], w)
    x = canvas.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return x.gather(2, rows[:, None, :, None].expand(b, c, h, w))


def _theta(boxes: torch.Tensor, h: int, w: int, flip: torch.Tensor | None) -> torch.Tensor:
    """(B, 2, 3) affine maps from output to input normalised coordinates (x_n = 2 p / W - 1 for a
    pixel-edge coordinate p): output edge -1 -> box edge ``left``, +1 -> ``left + width``."""
    top, left, bh, bw = boxes.unbind(1)
    sx = bw / w
    if flip is not None:
        sx = torch.where(flip.to(boxes.device, torch.bool), -sx, sx)  # mirror about the box's centre
    zero = torch.zeros_like(sx)
    row_x = torch.stack([sx, zero, (2 * left + bw) / w - 1], 1)
    row_y = torch.stack([zero, bh / h, (2 * top + bh) / h - 1], 1)
    return torch.stack([row_x, row_y], 1)


def _pair(flag: str, value: Sequence[float]) -> tuple[float, float]:
    """Two finite numbers (min, max), or a UsageError naming ``flag``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r}: expected two numbers MIN,MAX") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"{flag} {lo},{hi}: expected finite numbers")
    return lo, hi


@dataclass
class PhotoCrop:
    """The photo transform of one split: random resized crop + flip (train) or center crop."""

    train: bool
    size: int
    scale: Sequence[float] = (0.08, 1.0)
    ratio: Sequence[float] = (3 / 4, 4 / 3)
    crop_pct: float = 0.875
    flip: bool = False  # random horizontal flips, p = 0.5 (training)
    antialias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise UsageError(f"--image-size {self.size}: expected a positive integer")
        self.scale = lo, hi = _pair("--crop-scale", self.scale)
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"--crop-scale {lo},{hi}: expected 0 < min <= max <= 1")
        self.ratio = lo, hi = _pair("--crop-ratio", self.ratio)
        if not 0 < lo <= hi:
            raise UsageError(f"--crop-ratio {lo},{hi}: expected 0 < min <= max")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not 0 < self.crop_pct <= 1:
            raise UsageError(f"--crop-pct {self.crop_pct}: expected 0 < pct <= 1")

    def params(self, hw: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The boxes (and, with ``flip``, the flips) of N images, drawn on the CPU."""
        if self.train:
            out = {"boxes": random_resized_boxes(hw, generator, self.scale, self.ratio)}
        else:  # the evaluation crop; training on it may still flip
            out = {"boxes": center_boxes(hw, self.crop_pct)}
        if self.flip:
            out["flips"] = torch.randint(0, 2, (len(hw),), generator=generator).bool()
        return out

    def apply(self, canvas: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch of canvases and its slice of ``params`` -> float32 (B, C, size, size), 0..255."""
        return resample(canvas, params["boxes"], self.size, params.get("flips"), antialias=self.antialias)
