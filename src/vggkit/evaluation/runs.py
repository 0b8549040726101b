"""Reading what a run folder or checkpoint holds, and rebuilding its data exactly.

A run folder means its final weights (``checkpoints/last.safetensors``): those are what
summary.json and predictions.npz report (the best checkpoint, chosen on the validation
split, is ``checkpoints/best.safetensors``: pass that file to use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggkit.data.store import MappedImages
from vggkit.errors import CheckpointError, DataError, UsageError
from vggkit.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_classes,
    imagenet_model_name,
    imagenet_weights,
)
from vggkit.runfolder import RunFolder
from vggkit.training.checkpoint import Checkpoint, model_from_checkpoint

RUN_WEIGHTS = "last"
SPLITS = ("test", "val", "train")
TORCH_SUFFIXES = (".pth", ".pt")
IMAGENET_SIZE = 224  # the side torchvision's ImageNet VGG weights expect, with IMAGENET_MEAN/STD
TORCHVISION_DATASET = "imagenet"  # a name only: no such vggkit dataset, so evaluate needs --dataset


def load_model(run_or_checkpoint: str | Path,
               classes_file: str | Path | None = None) -> tuple[torch.nn.Module, Checkpoint]:
    """The network (eval mode, CPU, fp32) and its checkpoint. A torchvision-layout VGG
    weights file (.pth/.pt) gets a checkpoint made up for it (see ``torchvision_checkpoint``);
    ``classes_file`` names its classes. ``imagenet:MODEL`` is torchvision's ImageNet weights
    for MODEL, found in a cache or downloaded (``vggkit.models.pretrained``), with ImageNet's
    class names."""
    imagenet = imagenet_model_name(run_or_checkpoint)
    if imagenet is not None:
        weights = imagenet_weights(imagenet, mirror_flag=None)
        return torchvision_checkpoint(weights, classes_file, default_classes=imagenet_classes())
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file)")
    if is_torch_weights(path):
        return torchvision_checkpoint(path, classes_file)
    if classes_file is not None:
        raise UsageError(f"--classes {classes_file}: only for torchvision weights (.pth/.pt); "
                         f"{path} names its own classes")
    return model_from_checkpoint(path, which=RUN_WEIGHTS)


def is_torch_weights(path: Path) -> bool:
    """A file torch.save wrote (.pth/.pt, or any name with its zip container) rather than a
    vggkit safetensors checkpoint."""
    if not path.is_file():
        return False
    if path.suffix.lower() in TORCH_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_class_names(path: str | Path, count: int) -> list[str]:
    """``--classes FILE``: one class name a line (blank lines ignored), exactly ``count``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--classes {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--classes {path}: not UTF-8 text (expected one class name a line)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != count:
        raise UsageError(f"--classes {path}: {len(names)} names, but the weights have {count} "
                         "classes (one name a line)")
    return names


def torchvision_checkpoint(path: Path, classes_file: str | Path | None = None, *,
                           default_classes: list[str] | None = None
                           ) -> tuple[torch.nn.Module, Checkpoint]:
    """A torchvision-layout VGG state dict as a network with the ``imagenet`` head and a
    checkpoint that says how to use it: ImageNet's normalisation at 224x224, classes named
    by ``classes_file``, else ``default_classes`` (when they are as many), else "0".."N-1"
    (a .pth file names no classes)."""
    from vggkit.models import load_torchvision_vgg

    model = load_torchvision_vgg(path, IMAGENET_SIZE)
    n = model.num_classes
    if classes_file is not None:
        classes = read_class_names(classes_file, n)
    elif default_classes is not None and len(default_classes) == n:
        classes = list(default_classes)
    else:
        classes = [str(i) for i in range(n)]
    meta = {
        "weights": "torchvision",
        "config": {"dataset": TORCHVISION_DATASET, "channels_last": True},
        "classes": classes,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "image_shape": [model.in_channels, IMAGENET_SIZE, IMAGENET_SIZE],
        "model": {"name": model.name, "head": "imagenet", "num_classes": n,
                  "in_channels": model.in_channels, "input_size": IMAGENET_SIZE, "dropout": 0.5},
    }
    return model, Checkpoint(model.state_dict(), meta, path=path)


@dataclass
class SplitData:
    images: Any  # uint8 (N, C, H, W) tensor, or a photo folder's MappedImages canvases
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    dataset: str


def load_split(meta: dict[str, Any], split: str = "test", *, dataset: str | None = None,
               data_dir: str | None = None) -> SplitData:
    """A split of the run's dataset (or of ``dataset``), prepared as in training: the same
    image size, channels, subset, validation split, seed and bad-image skipping. Never
    downloads."""
    from vggkit.data import load_dataset

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = meta["config"]
    channels, size = meta["image_shape"][0], meta["image_shape"][1]
    own = dataset is None or dataset == cfg["dataset"]
    name = cfg["dataset"] if dataset is None else dataset
    photos = bool(meta.get("photo")) and own
    data = load_dataset(
        name,
        data_dir=data_dir if data_dir is not None else cfg.get("data_dir"),
        download=False,
        # A photo run's cache is keyed by the flags it was trained with: the same canvases.
        image_size=cfg.get("image_size") if photos else size,
        photos=True if photos else None,
        stored_size=cfg.get("stored_size") if photos else None,
        channels=channels,
        subset=cfg.get("subset") if own else None,
        val_split=cfg.get("val_split", 0.0),  # absent: a run from before validation by default
        seed=cfg.get("seed", 0),
        skip_bad_images=bool(cfg.get("skip_bad_images", False)),
        progress=False,
    )
    if list(data.classes) != list(meta["classes"]):
        flag = f"--dataset {name}" if not own else f"dataset {name}"
        raise UsageError(
            f"{flag}: its {len(data.classes)} classes ({_preview(data.classes)}) differ from the "
            f"{len(meta['classes'])} the model was trained on ({_preview(meta['classes'])})")
    x, y = {"test": (data.x_test, data.y_test), "val": (data.x_val, data.y_val),
            "train": (data.x_train, data.y_train)}[split]
    if x is None or len(x) == 0:
        if split == "val":
            raise UsageError(f"--split val: the run was trained with --val-split 0, so {name} "
                             "has no validation split here; use --split test")
        raise DataError(f"dataset {name} has no {split} split")
    images = x if isinstance(x, MappedImages) else torch.as_tensor(x)
    return SplitData(images, torch.as_tensor(y), list(data.classes), name)


class CroppedImages:
    """A photo split seen as the model sees it: ``images[idx]`` gives those photos'
    evaluation crops as uint8 (k, C, size, size), read from the cache on demand."""

    def __init__(self, images: MappedImages, crop: Any) -> None:
        self.images, self.crop = images, crop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> np.ndarray:
        idx = np.atleast_1d(np.arange(len(self.images))[index])
        p = self.crop.params(self.images.sizes()[idx], torch.Generator())
        out = self.crop.apply(self.images.gather(idx), p).round_().clamp_(0, 255).to(torch.uint8)
        return out[0].numpy() if np.ndim(index) == 0 else out.numpy()


def as_arrays(data: SplitData, meta: dict[str, Any]):
    """The split's images for display: the uint8 array, or for photos their crops on demand."""
    from vggkit.data.crops import eval_crop

    if isinstance(data.images, MappedImages):
        return CroppedImages(data.images, eval_crop(meta))
    return data.images.numpy()


def _preview(names: list[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_predictions(run: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(logits, labels) of the test split from predictions.npz, or None if absent."""
    return RunFolder(run).read_predictions()
