"""Photo crop geometry: random resized and center boxes, and their batched bilinear resampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vggkit.data.photo import PhotoCrop, center_boxes, random_resized_boxes, resample
from vggkit.errors import UsageError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sizes(n: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (n, 2), generator=_gen(seed))


def _photo_canvases(hw: torch.Tensor, side: int, photo: int = 0, outside: int = 255) -> torch.Tensor:
    """Canvases filled with ``outside`` holding a ``photo``-valued image of size hw at the top-left."""
    x = torch.full((len(hw), 3, side, side), outside, dtype=torch.uint8)
    for i, (h, w) in enumerate(hw.tolist()):
        x[i, :, :h, :w] = photo
    return x


def _get_params_reference(h: int, w: int, u: list[float], scale, ratio, attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params, written out per image, fed the same uniforms."""
    for k in range(attempts):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[k])
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lo + (hi - lo) * u[attempts + k])
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return math.floor(u[-2] * (h - ch + 1)), math.floor(u[-1] * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _bilinear_reference(img: torch.Tensor, box, size: int, flip: bool) -> torch.Tensor:
    """One image's box resampled the slow, obvious way in float64: each output pixel centre mapped
    into the box, bilinear taps clamped to the pixels the box covers."""
    top, left, bh, bw = (float(v) for v in box)
    r0, r1 = math.floor(top + 1e-3), math.ceil(top + bh - 1e-3) - 1
    c0, c1 = math.floor(left + 1e-3), math.ceil(left + bw - 1e-3) - 1
    out = torch.empty(img.shape[0], size, size, dtype=torch.float64)
    for i in range(size):
        y = top + (i + 0.5) * bh / size - 0.5
        for j in range(size):
            jj = size - 1 - j if flip else j
            x = left + (jj + 0.5) * bw / size - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            fy, fx = y - y0, x - x0
            ya, yb = min(max(y0, r0), r1), min(max(y0 + 1, r0), r1)
            xa, xb = min(max(x0, c0), c1), min(max(x0 + 1, c0), c1)
            out[:, i, j] = ((1 - fy) * ((1 - fx) * img[:, ya, xa] + fx * img[:, ya, xb])
                            + fy * ((1 - fx) * img[:, yb, xa] + fx * img[:, yb, xb]))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", [7, 32, 100, 224, 333])
def test_whole_box_at_its_own_size_is_the_identity_and_flip_mirrors_it(device: str, side: int) -> None:
    x = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8, generator=_gen(side)).to(device)
    boxes = torch.tensor([[0.0, 0.0, side, side]]).expand(3, 4)
    out = resample(x, boxes, side)
    assert out.dtype == torch.float32 and out.device == x.device
    assert torch.equal(out, x.float())
    flipped = resample(x, boxes, side, torch.tensor([True, False, True]))
    assert torch.equal(flipped[0], x[0].flip(-1).float())
    assert torch.equal(flipped[1], x[1].float())
    assert torch.equal(flipped[2], x[2].flip(-1).float())


def test_center_box_is_the_centred_square_of_the_shorter_side() -> None:
    boxes = center_boxes(torch.tensor([[100, 200], [300, 150], [64, 64]]), crop_pct=0.875)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[6.25, 56.25, 87.5, 87.5], [84.375, 9.375, 131.25, 131.25], [4.0, 4.0, 56.0, 56.0]]
    assert center_boxes(torch.tensor([[50, 80]]), crop_pct=1.0).tolist() == [[0.0, 15.0, 50.0, 50.0]]


def test_random_resized_boxes_match_torchvisions_get_params_per_image() -> None:
    hw = torch.cat([_sizes(200, 1, 300), torch.tensor([[1, 1000], [1000, 1], [10, 10], [3, 200]])])
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = random_resized_boxes(hw, _gen(5), scale, ratio)
    uniforms = torch.rand((len(hw), 22), generator=_gen(5), dtype=torch.float64)
    want = [_get_params_reference(h, w, u, scale, ratio) for (h, w), u in zip(hw.tolist(), uniforms.tolist())]
    assert boxes.tolist() == [[float(v) for v in row] for row in want]


def test_random_resized_boxes_fall_back_to_the_central_crop_of_the_allowed_ratio() -> None:
    hw = torch.tensor([[1, 1000], [1000, 1], [10, 10]])
    # No try can fit a 1-pixel-high image; nor a whole-area box of aspect 2..3 into a square.
    assert random_resized_boxes(hw[:2], _gen()).tolist() == [[0, 499, 1, 1], [499, 0, 1, 1]]
    assert random_resized_boxes(hw[2:], _gen(), scale=(1.0, 1.0), ratio=(2.0, 3.0)).tolist() == [[2, 0, 5, 10]]


def test_random_resized_boxes_stay_inside_with_area_and_aspect_in_range() -> None:
    hw = _sizes(4000, 64, 400, seed=1)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, ch, cw = random_resized_boxes(hw, _gen(2), scale, ratio).double().unbind(1)
    h, w = hw[:, 0].double(), hw[:, 1].double()
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    assert torch.equal(top, top.round()) and torch.equal(cw, cw.round())
    # Rounding the sides to whole pixels moves area and aspect by at most about a pixel per side.
    fraction = ch * cw / (h * w)
    slack = 2.5 / torch.minimum(ch, cw)
    assert (fraction >= scale[0] * (1 - slack)).all() and (fraction <= 1).all()
    aspect = cw / ch
    assert (aspect >= ratio[0] * (1 - slack)).all() and (aspect <= ratio[1] * (1 + slack)).all()


def test_random_resized_boxes_are_uniform_in_log_ratio_and_area() -> None:
    # Areas up to half the image never need a second try, so the draws are the plain distributions.
    scale, ratio = (0.08, 0.5), (3 / 4, 4 / 3)
    n = 20000
    boxes = random_resized_boxes(torch.tensor([[1000, 1000]]).expand(n, 2), _gen(3), scale, ratio)
    top, left, ch, cw = boxes.double().unbind(1)
    log_ratio = (cw / ch).log()
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    counts = torch.histc(log_ratio, bins=5, min=lo, max=hi)
    assert counts.sum() >= 0.99 * n  # the others are a rounded pixel past an end of the range
    assert ((counts / n - 0.2).abs() < 0.02).all(), counts
    area = ch * cw / 1e6
    assert abs(area.mean().item() - sum(scale) / 2) < 0.01
    positions = torch.histc(left / (1000 - cw), bins=4, min=0, max=1)
    assert ((positions / n - 0.25).abs() < 0.02).all(), positions


def test_boxes_differ_per_image_replay_per_seed_and_draw_a_fixed_count() -> None:
    hw = torch.tensor([[240, 320]]).expand(64, 2)
    a, b, other = (random_resized_boxes(hw, _gen(s)) for s in (7, 7, 8))
    assert len(torch.unique(a, dim=0)) == 64
    assert torch.equal(a, b) and not torch.equal(a, other)
    # Fitting on the first try or falling back consumes the same random numbers.
    g1, g2 = _gen(9), _gen(9)
    random_resized_boxes(torch.tensor([[500, 500]] * 5), g1)
    random_resized_boxes(torch.tensor([[1, 1000]] * 5), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [8, 24, 96])  # 8: every box >= 2x the output, pooled first
def test_pixels_outside_the_photo_never_leak_into_any_crop(device: str, size: int) -> None:
    hw = torch.cat([_sizes(30, 20, 64, seed=4), torch.tensor([[64, 20], [20, 64], [64, 64]])])
    canvas = _photo_canvases(hw, 64).to(device)
    for train in (True, False):
        crop = PhotoCrop(train=train, size=size, flip=True)
        params = crop.params(hw, _gen(size))
        out = crop.apply(canvas, {k: v.to(device) for k, v in params.items()})
        assert out.shape == (len(hw), 3, size, size) and out.dtype == torch.float32
        assert torch.count_nonzero(out) == 0
        # And the photo itself reaches every output pixel (the photo = 255, the outside = 0).
        bright = crop.apply(_photo_canvases(hw, 64, photo=255, outside=0).to(device), params)
        assert bool((bright == 255).all())


def test_resample_matches_a_per_image_bilinear_reference_in_float64() -> None:
    x = torch.rand((4, 2, 23, 23), generator=_gen(1), dtype=torch.float64) * 255
    boxes = torch.tensor([[0.0, 0.0, 23, 23], [3.25, 1.5, 10.5, 7.75], [5, 9, 14, 14], [2.0, 0.0, 4.0, 21.0]])
    flip = torch.tensor([False, True, False, True])
    for size in (6, 11, 17):
        got = resample(x, boxes, size, flip, antialias=False)
        assert got.dtype == torch.float64
        for i in range(len(x)):
            want = _bilinear_reference(x[i], boxes[i].tolist(), size, bool(flip[i]))
            torch.testing.assert_close(got[i], want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [5, 9, 16, 30])
def test_integer_box_equals_interpolate_of_the_cropped_region(size: int) -> None:
    x = torch.rand((3, 3, 20, 20), generator=_gen(2), dtype=torch.float64) * 255
    boxes = torch.tensor([[0, 0, 20, 20], [4, 7, 13, 9], [11, 2, 9, 18]], dtype=torch.float32)
    got = resample(x, boxes, size, antialias=False)
    for i, (t, l, h, w) in enumerate(boxes.long().tolist()):
        want = F.interpolate(x[i : i + 1, :, t : t + h, l : l + w], size=(size, size), mode="bilinear",
                             align_corners=False)
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=1e-9)


def test_antialias_pools_the_batch_only_when_every_box_shrinks_at_least_2x() -> None:
    # A one-pixel checkerboard shrunk 3x: unfiltered bilinear hits single pixels (0 or 255),
    # the 3x3 pool first gives 4/9 or 5/9 of 255.
    checker = ((torch.arange(24)[:, None] + torch.arange(24)[None, :]) % 2 * 255).to(torch.uint8)
    x = checker.expand(2, 3, 24, 24).contiguous()
    whole = torch.tensor([[0.0, 0.0, 24, 24]]).expand(2, 4)
    pooled = resample(x, whole, 8)
    assert torch.equal(pooled, F.avg_pool2d(x.float(), 3))
    assert (pooled - 127.5).abs().max() < 15
    assert torch.equal((resample(x, whole, 8, antialias=False) - 127.5).abs().unique(), torch.tensor([127.5]))
    # One box only 1.5x the output: no pooling for the batch.
    mixed = torch.tensor([[0.0, 0.0, 32, 32], [0.0, 0.0, 12, 12]])
    assert torch.equal(resample(x, mixed, 8), resample(x, mixed, 8, antialias=False))


def test_photo_crop_params_for_an_epoch_and_apply_to_a_batch() -> None:
    hw = _sizes(10, 30, 60)
    train = PhotoCrop(train=True, size=16, scale=[0.2, 1.0], ratio=[0.5, 2.0], flip=True)
    params = train.params(hw, _gen())
    assert set(params) == {"boxes", "flips"}
    assert params["boxes"].shape == (10, 4) and params["boxes"].device.type == "cpu"
    assert params["flips"].dtype == torch.bool and 0 < int(params["flips"].sum()) < 10
    assert torch.equal(params["boxes"], random_resized_boxes(hw, _gen(), (0.2, 1.0), (0.5, 2.0)))
    assert "flips" not in PhotoCrop(train=True, size=16, flip=False).params(hw, _gen())
    evaluation = PhotoCrop(train=False, size=16, crop_pct=0.9)
    g = _gen()
    state = g.get_state()
    eval_params = evaluation.params(hw, g)
    assert set(eval_params) == {"boxes"} and torch.equal(g.get_state(), state)  # no randomness
    flipped = PhotoCrop(train=False, size=16, flip=True).params(hw, _gen())  # center crop + flips
    assert set(flipped) == {"boxes", "flips"} and torch.equal(flipped["boxes"], center_boxes(hw))
    canvas = _photo_canvases(hw, 60, photo=0)
    out = evaluation.apply(canvas[:4], {k: v[:4] for k, v in eval_params.items()})
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"scale": (0.0, 1.0)}, "--crop-scale"),
    ({"scale": (0.6, 0.5)}, "--crop-scale"),
    ({"scale": (0.5, 1.2)}, "--crop-scale"),
    ({"scale": (0.5,)}, "--crop-scale"),
    ({"scale": ("a", 1)}, "--crop-scale"),
    ({"ratio": (0.0, 1.0)}, "--crop-ratio"),
    ({"ratio": (2.0, 1.0)}, "--crop-ratio"),
    ({"ratio": (1.0, float("inf"))}, "--crop-ratio"),
    ({"crop_pct": 0.0}, "--crop-pct"),
    ({"crop_pct": 1.5}, "--crop-pct"),
    ({"size": 0}, "--image-size"),
])
def test_photo_crop_rejects_bad_settings_in_one_line_naming_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(UsageError, match=f"^{flag} ") as info:
        PhotoCrop(**{"train": True, "size": 16, **kwargs})
    assert "\n" not in str(info.value)
