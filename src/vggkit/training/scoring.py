"""Predictions over a whole split and the one implementation of top-1, top-5 and loss,
shared by training (validation, final test) and ``vggkit evaluate``.

Ties: top-1 is the first of the largest logits (``argmax``), and top-k takes the k largest
by a stable sort, so top-1 is always among the top-5.
"""

from __future__ import annotations

import torch
from torch import nn

from vggkit.training.engine import Engine, predict_logits


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if len(labels) == 0:
        return 0.0
    k = min(k, logits.shape[1])
    top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return (top == labels[:, None]).any(1).double().mean().item()


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """{"loss", "acc", "top5_acc"} of fp32 logits; top-5 is None with 5 classes or fewer
    (it would always be 1)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": 0.0, "top5_acc": None}
    return {
        "loss": nn.functional.cross_entropy(logits.double(), labels).item(),
        "acc": topk_accuracy(logits, labels, 1),
        "top5_acc": topk_accuracy(logits, labels, 5) if logits.shape[1] > 5 else None,
    }


def tta_logits(model: nn.Module, images: torch.Tensor, engine: Engine,
               translate: int = 0) -> torch.Tensor:
    """Test-time augmentation, airbench's: the mean of the view and its mirror image; with
    ``translate`` t, that mean weighted 1/2 plus, 1/4 each, the same for the views shifted
    by t pixels up-left and down-right (reflect padding)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=engine.memory_format)

    def mirror(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (predict_logits(model, view(x), engine)
                      + predict_logits(model, view(x.flip(-1)), engine))

    logits = mirror(images)
    if translate:
        t = translate
        h, w = images.shape[-2:]
        padded = nn.functional.pad(images, (t, t, t, t), mode="reflect")
        shifted = mirror(padded[:, :, :h, :w]) + mirror(padded[:, :, 2 * t:2 * t + h,
                                                                2 * t:2 * t + w])
        logits = 0.5 * logits + 0.25 * shifted
    return logits


@torch.no_grad()
def collect_logits(model: nn.Module, loader, engine: Engine, tta: bool = False,
                   translate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels of a whole split, in loader order, on the CPU."""
    model.eval()
    outs, labels = [], []
    for images, target in loader.epoch(0):
        if tta:
            logits = tta_logits(model, images, engine, translate)
        else:
            logits = predict_logits(model, images, engine)
        outs.append(logits.cpu())
        labels.append(target.cpu())
    return torch.cat(outs), torch.cat(labels)
