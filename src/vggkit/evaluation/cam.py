"""Grad-CAM (Selvaraju et al. 2017): where in an image the network looked for a class.

The heat map is the last convolution's output, its channels weighted by the mean gradient
of the class score over each channel, summed, rectified and scaled to [0, 1]. Used by
``vggkit predict --cam`` and by the report's section on misclassified test images.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vggkit.errors import UsageError, unknown_name

MIN_SIDE = 128  # overlays are enlarged to at least this many pixels a side
ALPHA = 0.45  # weight of the heat map in the overlay
COLORMAP = "jet"
BATCH = 32  # images per forward/backward: bounds the memory of large inputs


def last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UsageError(f"Grad-CAM: {type(model).__name__} has no convolution")
    return convs[-1]


def grad_cam(model: nn.Module, inputs: torch.Tensor,
             classes: Sequence[int] | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (N, H, W) in [0, 1] at the input's size for normalised float ``inputs``
    (N, C, H, W), of ``classes`` (one per image) or else of each image's top class; and the
    classes used. The model should be in eval mode; its parameters are not changed."""
    saved: list[torch.Tensor] = []

    def keep(_module, _args, output):
        # A copy, so that an in-place ReLU after the convolution leaves it alone.
        output = output.clone()
        saved.append(output)
        return output

    hook = last_conv(model).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(inputs.detach().requires_grad_(True)).float()
            chosen = (logits.argmax(1) if classes is None
                      else torch.as_tensor(classes, device=logits.device).long())
            score = logits.gather(1, chosen[:, None]).sum()
            (grads,) = torch.autograd.grad(score, saved[0])
    finally:
        hook.remove()
    acts = saved[0].detach().float()
    weights = grads.float().mean((2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=inputs.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy(), chosen.cpu().numpy()


def grad_cam_batched(model: nn.Module, inputs: torch.Tensor,
                     classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grad_cam` over ``BATCH`` images at a time."""
    parts = [grad_cam(model, inputs[i:i + BATCH],
                      None if classes is None else list(classes[i:i + BATCH]))
             for i in range(0, len(inputs), BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float as the training loader feeds the model."""
    c = images.shape[1]
    m = torch.as_tensor(list(mean), dtype=torch.float32).expand(c).view(1, c, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).expand(c).view(1, c, 1, 1)
    return (images.float() / 255.0 - m) / s


def overlay(image: np.ndarray, cam: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """uint8 (C, H, W) image and its (H, W) heat map -> uint8 RGB, blended and enlarged by a
    whole factor to at least ``min_side``: the image by nearest neighbour (small images stay
    crisp), the heat map bilinearly (it is smooth)."""
    from matplotlib import colormaps

    factor = max(1, -(-min_side // min(image.shape[1:])))
    rgb = np.repeat(image[:1], 3, 0) if image.shape[0] == 1 else image[:3]
    rgb = rgb.transpose(1, 2, 0).astype(np.float32).repeat(factor, 0).repeat(factor, 1)
    big_cam = nn.functional.interpolate(torch.as_tensor(cam, dtype=torch.float32)[None, None],
                                        scale_factor=factor, mode="bilinear")[0, 0].numpy()
    heat = colormaps[COLORMAP](np.clip(big_cam, 0.0, 1.0))[..., :3] * 255.0
    blended = (1 - ALPHA) * rgb + ALPHA * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def class_index(name: str, classes: Sequence[str]) -> int:
    if name not in classes:
        raise unknown_name("--cam-class", name, classes)
    return list(classes).index(name)


def cam_paths(images: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """OUTDIR/<stem>-cam.png per image; a number is added where two images share a stem."""
    stems = [Path(p).stem for p in images]
    return [out_dir / (f"{s}-cam.png" if stems.count(s) == 1 else f"{s}-{i + 1}-cam.png")
            for i, s in enumerate(stems)]


def write_cams(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
               class_name: str | None = None,
               classes_file: str | Path | None = None) -> list[dict[str, object]]:
    """``predict --cam``: one overlay PNG per image file, of ``class_name`` or else of the
    top class. Returns, per image, the file written and the class shown."""
    from vggkit.evaluation.predictor import prepare_images
    from vggkit.evaluation.runs import load_model

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--cam {out_dir}: exists and is not a folder")
    model, ckpt = load_model(checkpoint, classes_file)
    meta = ckpt.meta
    classes = list(meta["classes"])
    target = None if class_name is None else class_index(class_name, classes)
    pixels = prepare_images(images, meta)
    inputs = normalise(torch.from_numpy(pixels), meta["mean"], meta["std"])
    wanted = None if target is None else [target] * len(pixels)
    cams, shown = grad_cam_batched(model, inputs, wanted)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = cam_paths(images, out_dir)
        for path, image, cam in zip(paths, pixels, cams):
            path.write_bytes(png_bytes(overlay(image, cam)))
    except OSError as exc:
        raise UsageError(f"--cam {out_dir}: cannot write there ({exc.strerror or exc})") from None
    return [{"image": str(p), "cam": str(path), "class": classes[int(c)]}
            for p, path, c in zip(images, paths, shown)]
