"""Unbalanced classes: the class counts, inverse-frequency loss weights (``--class-weights``,
Keras's ``class_weight``) and the warning when one class outnumbers another by far.
(``--balanced-sampling``, the other remedy, is the loader's: each epoch's seeded order draws
the classes evenly.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from vggkit.errors import UsageError

IMBALANCE_RATIO = 5.0  # the health check warns above this ratio of class sizes


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.to(torch.int64).cpu(), minlength=num_classes).tolist()


def mean_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: the mean over the classes present of each one's recall (equal to
    the accuracy when the classes are equal in size)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    predicted = torch.as_tensor(logits).argmax(1)
    recalls = [(predicted[labels == c] == c).double().mean().item() for c in labels.unique()]
    return sum(recalls) / max(1, len(recalls))


def class_weights(spec: str, counts: list[int], classes: list[str]) -> torch.Tensor:
    """``auto``: n / (K x n_c), scikit-learn's "balanced" weights (what Keras users pass as
    ``class_weight``), so that every class weighs the same in the loss. A FILE: a YAML or JSON
    mapping from every class (its name, or its index as Keras's ``class_weight`` dict) to a
    positive weight."""
    if spec == "auto":
        total, k = sum(counts), len(counts)
        if min(counts) == 0:
            empty = classes[counts.index(0)]
            raise UsageError(f"--class-weights auto: class {empty!r} has no training images")
        return torch.tensor([total / (k * c) for c in counts], dtype=torch.float32)
    return torch.tensor(read_weights_file(Path(spec), classes), dtype=torch.float32)


def read_weights_file(path: Path, classes: list[str]) -> list[float]:
    where = f"--class-weights {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file (give 'auto' or a YAML/JSON file of "
                         "class: weight)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: cannot read it ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where}: must hold a mapping of class: weight, like 'cat: 2.0'")
    by_name = {str(k): v for k, v in data.items()}
    weights = []
    for index, name in enumerate(classes):
        value = by_name.get(name, by_name.get(str(index)))
        if value is None:
            raise UsageError(f"{where}: class {name!r} (index {index}) has no weight; list "
                             f"every class of the dataset ({len(classes)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{where}: the weight of {name!r} must be a positive number, got "
                             f"{value!r}")
        weights.append(float(value))
    unknown = set(by_name) - set(classes) - {str(i) for i in range(len(classes))}
    if unknown:
        raise UsageError(f"{where}: {sorted(unknown)[0]!r} is not a class of the dataset "
                         f"(classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    return weights


def imbalance_warning(counts: list[int], classes: list[str], config: Any) -> str | None:
    """One line when the largest class has over IMBALANCE_RATIO x the images of the smallest
    and neither remedy is on."""
    small, large = min(counts), max(counts)
    if large <= IMBALANCE_RATIO * max(small, 1) or config.class_weights or config.balanced_sampling:
        return None
    return (f"unbalanced classes: {classes[counts.index(large)]!r} has {large:,} training "
            f"images, {classes[counts.index(small)]!r} {small:,} ({large / max(small, 1):.0f}x); "
            "accuracy will favour the large classes: try --class-weights auto or "
            "--balanced-sampling, and read the per-class recall in the report")
