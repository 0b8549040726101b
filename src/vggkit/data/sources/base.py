"""What every dataset reader returns, before preparation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vggkit.errors import DataError


@dataclass
class RawData:
    """Decoded dataset: uint8 images (N, C, H, W), int64 labels, class names.

    ``x_test`` is None for a folder holding a single set of class folders; the caller then holds
    a test split out of it.
    """

    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: str
    from_cache: bool = False
    skipped: list[str] = field(default_factory=list)  # bad images skipped with skip_bad_images


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Labels as int64, raising DataError (naming ``where``) if any is outside [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{where}: label {bad} is outside 0..{num_classes - 1}")
    return labels
