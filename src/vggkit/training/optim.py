"""Optimizers and learning-rate schedules.

Schedules are pure functions of the iteration (plus, for ``plateau``, a small state that
is saved in checkpoints), so an interrupted run resumes with exactly the same rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vggkit.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of convolutions and dense layers only; BatchNorm
    parameters and biases are not decayed (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    betas = (config.betas[0], config.betas[1])
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


@dataclass
class Schedule:
    """The learning rate at each iteration; ``lr_at(it)`` for the per-step schedules and
    ``end_epoch(val_acc)`` for ``plateau``."""

    kind: str
    base_lr: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    decay: float = 0.0
    plateau_patience: int = 3
    state: dict[str, Any] = field(default_factory=lambda: {"factor": 1.0, "best": None, "bad": 0})

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)

    def lr_at(self, it: int) -> float:
        warm = self.warmup_epochs * self.steps_per_epoch
        if self.kind == "onecycle":
            # Linear up over the warm-up (default 30% of training, as PyTorch's OneCycleLR),
            # then linear down to zero: the triangle that airbench and fast CIFAR runs use.
            up = warm if warm > 0 else 0.3 * self.total_steps
            if it < up:
                return self.base_lr * (0.1 + 0.9 * it / up)
            return self.base_lr * max(0.0, (self.total_steps - it) / max(1.0, self.total_steps - up))
        if warm > 0 and it < warm:
            return self.base_lr * (it + 1) / warm
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.gamma ** (it // (self.step_size * self.steps_per_epoch))
        if self.kind == "cosine":
            span = max(1.0, self.total_steps - warm)
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * min(1.0, (it - warm) / span)))
        if self.kind == "time-decay":
            return self.base_lr / (1 + self.decay * it)
        if self.kind == "plateau":
            return self.base_lr * self.state["factor"]
        raise ValueError(self.kind)

    def end_epoch(self, val_acc: float) -> bool:
        """For ``plateau``: divide the rate by 1/gamma when validation accuracy has not
        improved for ``plateau_patience`` epochs, as the VGG paper did. True if cut."""
        if self.kind != "plateau":
            return False
        best = self.state["best"]
        if best is None or val_acc > best:
            self.state.update(best=val_acc, bad=0)
            return False
        self.state["bad"] += 1
        if self.state["bad"] >= self.plateau_patience:
            self.state.update(factor=self.state["factor"] * self.gamma, bad=0)
            return True
        return False

    @staticmethod
    def from_config(config: TrainConfig, lr: float, steps_per_epoch: int) -> Schedule:
        return Schedule(
            kind=config.schedule,
            base_lr=lr,
            steps_per_epoch=steps_per_epoch,
            epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            step_size=config.step_size,
            gamma=config.gamma,
            decay=config.decay,
            plateau_patience=config.plateau_patience,
        )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
