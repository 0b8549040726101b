"""Reading what a run folder or checkpoint holds, and rebuilding its data exactly.

A run folder means its final weights (``checkpoints/last.safetensors``): those are what
summary.json and predictions.npz report, and choosing "best" by accuracy on the test split
(when training had no --val-split) would report a test score selected on the test set.
Pass a checkpoint file to use another.
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


def load_model(run_or_checkpoint: str | Path) -> tuple[torch.nn.Module, Checkpoint]:
    """The network (eval mode, CPU, fp32) and its checkpoint."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file)")
    return model_from_checkpoint(path, which=RUN_WEIGHTS)


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
