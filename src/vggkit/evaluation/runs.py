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

from vggkit.errors import CheckpointError, DataError, UsageError
from vggkit.runfolder import RunFolder
from vggkit.training.checkpoint import Checkpoint, model_from_checkpoint

RUN_WEIGHTS = "last"
SPLITS = ("test", "val", "train")
# How torchvision's ImageNet VGG weights expect their input.
TORCH_SUFFIXES = (".pth", ".pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
TORCHVISION_DATASET = "imagenet"  # a name only: no such vggkit dataset, so evaluate needs --dataset


def load_model(run_or_checkpoint: str | Path,
               classes_file: str | Path | None = None) -> tuple[torch.nn.Module, Checkpoint]:
    """The network (eval mode, CPU, fp32) and its checkpoint. A torchvision-layout VGG
    weights file (.pth/.pt) gets a checkpoint made up for it (see ``torchvision_checkpoint``);
    ``classes_file`` names its classes."""
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


def torchvision_checkpoint(path: Path, classes_file: str | Path | None = None
                           ) -> tuple[torch.nn.Module, Checkpoint]:
    """A torchvision-layout VGG state dict as a network with the ``imagenet`` head and a
    checkpoint that says how to use it: ImageNet's normalisation at 224x224, classes named
    "0".."N-1" (ImageNet's names are not available offline) unless ``classes_file``."""
    from vggkit.models import load_torchvision_vgg

    model = load_torchvision_vgg(path, IMAGENET_SIZE)
    n = model.num_classes
    classes = read_class_names(classes_file, n) if classes_file is not None else [str(i) for i in range(n)]
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
    images: torch.Tensor  # uint8 (N, C, H, W)
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
    data = load_dataset(
        name,
        data_dir=data_dir if data_dir is not None else cfg.get("data_dir"),
        download=False,
        image_size=size,
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
    return SplitData(torch.as_tensor(x), torch.as_tensor(y), list(data.classes), name)


def _preview(names: list[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_predictions(run: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(logits, labels) of the test split from predictions.npz, or None if absent."""
    return RunFolder(run).read_predictions()
