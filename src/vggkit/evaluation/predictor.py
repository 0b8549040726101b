"""``vggkit predict``: class probabilities for image files of any size and mode, prepared
as the checkpoint's training data was (size, channels, normalisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggkit.errors import DataError, UsageError
from vggkit.evaluation.runs import load_model


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image {path}: no such file")
    if not path.is_file():
        raise UsageError(f"image {path}: not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"image {path}: cannot read it ({exc.strerror or exc})") from None


def prepare_image(path: str | Path, channels: int, size: int, folder_dataset: bool) -> np.ndarray:
    """An image file as uint8 (channels, size, size), prepared as the training images were:
    decoded by the image-folder reader (grayscale modes to L, others to RGB, 16-bit scaled to
    8), resized with antialiased bilinear interpolation (Pillow's while decoding, for a model
    trained on an image folder; the array path's otherwise) and converted to the model's
    channels (ITU-R 601 luma, or the plane repeated)."""
    from vggkit.data.prepare import convert_channels, resize
    from vggkit.data.sources.folder import BadImage, decode_image

    blob = read_bytes(path)
    try:
        array, _gray = decode_image(blob, (size, size) if folder_dataset else None)
    except BadImage as exc:
        raise DataError(f"image {path}: {exc}") from None
    image = torch.tensor(array, dtype=torch.uint8)  # a copy: Pillow's array is read-only
    image = image[None, None] if image.ndim == 2 else image.permute(2, 0, 1)[None]
    # The order of vggkit.data.load_dataset: to one channel before resizing, to three after.
    if channels == 1:
        image = convert_channels(image, 1)
    image = resize(image, size)
    if channels == 3:
        image = convert_channels(image, 3)
    return image[0].numpy()


TORCHVISION_STORED_SIDE = 448  # photos for ImageNet weights: longer side, before the 87.5% crop


def prepare_photo(path: str | Path, channels: int, size: int, stored_side: int, crop_pct: float) -> np.ndarray:
    """A photo as uint8 (channels, size, size), prepared as a photo run's evaluation was:
    decoded with its longer side fitted to the stored side (aspect kept), then the shorter
    side resized to size / crop_pct and the center size x size taken."""
    from vggkit.data.photo import PhotoCrop
    from vggkit.data.sources.folder import BadImage
    from vggkit.data.sources.photos import fit_decode

    try:
        array = fit_decode(read_bytes(path), stored_side, channels)
    except BadImage as exc:
        raise DataError(f"image {path}: {exc}") from None
    h, w = array.shape[:2]
    canvas = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    crop = PhotoCrop(train=False, size=size, crop_pct=crop_pct, flip=False)
    out = crop.apply(canvas, crop.params(torch.tensor([[h, w]]), torch.Generator()))
    return out.round_().clamp_(0, 255).to(torch.uint8)[0].numpy()


def prepare_images(paths: list[str | Path], meta: dict[str, Any]) -> np.ndarray:
    """The image files as the checkpoint's model expects them, stacked: a photo run's (and
    torchvision's ImageNet weights') evaluation crop, else resized as its training images."""
    channels, size = meta["image_shape"][0], meta["image_shape"][1]
    photo = meta.get("photo")
    if meta.get("weights") == "torchvision":
        photo = {"stored_side": TORCHVISION_STORED_SIDE, "crop_pct": 0.875}
    if photo:
        return np.stack([prepare_photo(p, channels, size, photo["stored_side"], photo["crop_pct"])
                         for p in paths])
    folder = str(meta["config"].get("dataset", "")).startswith("folder:")
    return np.stack([prepare_image(p, channels, size, folder) for p in paths])


def predict(checkpoint: str | Path, images: list[str | Path], *, topk: int = 5,
            device: str = "auto", batch_size: int = 64,
            classes_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file, in the order given.
    ``checkpoint`` may also be torchvision-layout VGG weights (.pth/.pt), whose classes
    ``classes_file`` names."""
    from vggkit.data import Loader
    from vggkit.training.engine import make_engine, predict_logits

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise UsageError(f"--topk must be a positive integer, got {topk!r}")
    if not images:
        raise UsageError("predict: give at least one image file")
    model, ckpt = load_model(checkpoint, classes_file)
    meta = ckpt.meta
    channels, size = meta["image_shape"][0], meta["image_shape"][1]
    # Every file is read (and checked) before the model runs, so a bad one fails fast.
    pixels = prepare_images(images, meta)
    engine = make_engine(device, "fp32", False, False)
    model = engine.prepare(model)
    loader = Loader(torch.from_numpy(pixels), torch.zeros(len(pixels), dtype=torch.int64),
                    batch_size, shuffle=False, mean=meta["mean"], std=meta["std"],
                    device=engine.device)
    probs = torch.cat([predict_logits(model, x, engine).softmax(1).cpu()
                       for x, _ in loader.epoch(0)])
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    classes = meta["classes"]
    return [
        {
            "image": str(path),
            "predictions": [
                {"class": classes[i], "index": int(i), "probability": float(p)}
                for p, i in zip(top.values[n].tolist(), top.indices[n].tolist())
            ],
        }
        for n, path in enumerate(images)
    ]


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        lines.append(result["image"])
        width = max(len(p["class"]) for p in result["predictions"])
        for rank, p in enumerate(result["predictions"], 1):
            lines.append(f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%")
    return "\n".join(lines)
