"""Classification metrics from logits and labels, in numpy (no model, no files).

Conventions follow scikit-learn's: the confusion matrix has true classes as rows and
predicted classes as columns; a precision, recall or F1 whose denominator is zero is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: ``cm[t, p]`` images of true class t predicted as p."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_metrics(cm: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class, from a confusion matrix."""
    tp = np.diag(cm)
    precision = _safe_ratio(tp, cm.sum(0))
    recall = _safe_ratio(tp, cm.sum(1))
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": classes[k],
            "index": k,
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(cm[k].sum()),
        }
        for k in range(len(classes))
    ]


def macro_average(per_class: list[dict[str, Any]]) -> dict[str, float]:
    """Unweighted means over the classes (scikit-learn's ``average="macro"``)."""
    return {
        key: float(np.mean([row[key] for row in per_class])) if per_class else 0.0
        for key in ("precision", "recall", "f1")
    }


def most_confused(cm: np.ndarray, classes: list[str], n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal cells, largest first (ties: by true, then predicted)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    true_idx, pred_idx = np.nonzero(off)
    counts = off[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -counts))[:n]
    return [
        {"true": classes[true_idx[i]], "predicted": classes[pred_idx[i]],
         "true_index": int(true_idx[i]), "predicted_index": int(pred_idx[i]),
         "count": int(counts[i])}
        for i in order
    ]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           classes: list[str]) -> dict[str, Any]:
    """Everything ``vggkit evaluate`` reports, JSON-able. ``top5`` is None with 5 classes or
    fewer (it would always be 1), as in summary.json."""
    from vggkit.training.scoring import score

    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(classes)
    predicted = logits.argmax(1)
    # Top-1, top-5 and loss come from the one implementation training uses.
    scores = score(torch.from_numpy(logits), torch.from_numpy(labels))
    cm = confusion_matrix(labels, predicted, num_classes)
    per_class = per_class_metrics(cm, classes)
    return {
        "n": int(len(labels)),
        "top1": scores["acc"],
        "top5": scores["top5_acc"],
        "loss": scores["loss"],
        "classes": list(classes),
        "per_class": per_class,
        "macro": macro_average(per_class),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, classes, 20),
    }
