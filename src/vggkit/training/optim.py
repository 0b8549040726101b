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


def parameter_groups(model: nn.Module, weight_decay: float, *, norm_lr_scale: float = 1.0,
                     decay_all: bool = False, features_lr_scale: float = 1.0
                     ) -> list[dict[str, Any]]:
    """Weight decay on weights of convolutions and dense layers only; BatchNorm
    parameters and biases are not decayed (decaying them only hurts) unless ``decay_all``
    (airbench decays everything). ``norm_lr_scale`` != 1 puts BatchNorm parameters in a
    group of their own whose rate is scaled by it (``lr_scale``, honoured by :func:`set_lr`)
    and whose decay is divided by it, so that their per-step decay stays lr x wd.
    ``features_lr_scale`` != 1 (fastai's discriminative rates) puts the parameters of
    ``model.features`` in groups of their own, after the others', whose ``lr_scale`` is
    multiplied by it (their decay is not: a lower rate decays them less, as in fastai).
    Parameters frozen by then are left out; freeze the features (--freeze-features) after
    this, so that the optimizer holds them."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                for p in m.parameters(recurse=False)}
    feature_ids = ({id(p) for p in model.features.parameters()}
                   if features_lr_scale != 1.0 and hasattr(model, "features") else set())
    separate_norm = norm_lr_scale != 1.0
    buckets: dict[tuple[bool, str], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        kind = ("norm" if separate_norm and id(param) in norm_ids
                else "decay" if param.ndim > 1 or decay_all else "no_decay")
        buckets.setdefault((id(param) in feature_ids, kind), []).append(param)
    groups = []
    for in_features in (False, True):
        scale = features_lr_scale if in_features else 1.0
        scaled = {"lr_scale": scale} if scale != 1.0 else {}
        decay, no_decay, norm = (buckets.get((in_features, k), [])
                                 for k in ("decay", "no_decay", "norm"))
        if decay or not in_features:  # the first group is always there: logs read its rate
            groups.append({"params": decay, "weight_decay": weight_decay, **scaled})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **scaled})
        if norm:
            groups.append({"params": norm, "lr_scale": norm_lr_scale * scale,
                           "weight_decay": weight_decay / norm_lr_scale if decay_all else 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, norm_lr_scale=config.norm_lr_scale,
                              decay_all=config.decay_all,
                              features_lr_scale=config.features_lr_scale)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    fused = {"fused": True} if fused_supported(model) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, **fused)
    betas = (config.betas[0], config.betas[1])
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, **fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def settle_fused_state(optimizer: torch.optim.Optimizer) -> None:
    """What torch's fused kernels assume and do not check. Every state tensor must be laid out
    as its parameter: the CPU kernel walks both in memory order, and a checkpoint's buffers
    load contiguous while channels_last weights are not, which would update the wrong
    elements. And fused SGD fails on a group where some parameters have a momentum buffer and
    others none (the features after --freeze-epochs); a zero buffer is exact there, as with no
    dampening the first step sets the buffer to the gradient either way. Call it after
    loading a state and whenever parameters start training."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        states = [optimizer.state.get(p) or {} for p in group["params"]]
        any_buffer = any("momentum_buffer" in s for s in states)
        for p, state in zip(group["params"], states):
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)
            if any_buffer and group.get("momentum") and "momentum_buffer" not in state:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)


def fused_supported(model: nn.Module) -> bool:
    """torch's fused kernels (one pass over all parameters) on CPU and CUDA: 3-6x faster
    than the per-parameter loop on CPU, which costs 20% of a classic VGG-16 step there
    (docs/benchmarks.md); the same update up to float rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                for p in params)


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
    triangle: tuple[float, float, float] = (0.2, 0.23, 0.07)
    cut_steps: int = 0  # steps left out of the last epoch (a --time-budget plan cut it short)
    state: dict[str, Any] = field(default_factory=lambda: {"factor": 1.0, "best": None, "bad": 0})

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs - self.cut_steps)

    def lr_at(self, it: int) -> float:
        warm = self.warmup_epochs * self.steps_per_epoch
        if self.kind == "onecycle":
            # The linear one-cycle: up from 0.1x over the warm-up (default 30% of training,
            # as PyTorch's OneCycleLR), then linear down to zero: the triangle fast CIFAR
            # runs use. Unlike OneCycleLR it is piecewise linear (no cosine annealing) and
            # leaves the momentum alone.
            up = warm if warm > 0 else 0.3 * self.total_steps
            if it < up:
                return self.base_lr * (0.1 + 0.9 * it / up)
            return self.base_lr * max(0.0, (self.total_steps - it) / max(1.0, self.total_steps - up))
        if self.kind == "triangle":
            # airbench's: linear from start to 1 at int(peak * steps), then linear to end.
            start, peak, end = self.triangle
            top = int(peak * self.total_steps)
            if it < top:
                return self.base_lr * (start + (1.0 - start) * it / top)
            frac = min(1.0, (it - top) / max(1, self.total_steps - top))
            return self.base_lr * (1.0 + (end - 1.0) * frac)
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
    def from_config(config: TrainConfig, lr: float, steps_per_epoch: int,
                    cut_steps: int = 0) -> Schedule:
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
            triangle=tuple(config.triangle),
            cut_steps=cut_steps,
        )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Lookahead:
    """airbench's lookahead averaging (Zhang et al. 2019 with an EMA): from epoch ``start``,
    every ``every`` steps, ``avg = lerp(avg, net, 1 - rho)`` with
    ``rho = decay**every * (step / total_steps)**power``, then the network is set to ``avg``;
    every float entry of the state dict takes part (weights and BatchNorm statistics). The
    first update only takes the copy. :meth:`end_epoch` copies the average back once more.

    Its state travels inside the optimizer's state dict (negative indices, see :meth:`pack`),
    so checkpoints carry it and a resumed run continues bit for bit.
    """

    KEY = "lookahead"

    def __init__(self, model: nn.Module, *, start: int, every: int, decay: float, power: float,
                 total_steps: int) -> None:
        self.model = model
        self.start, self.every, self.decay, self.power = start, every, decay, power
        self.total_steps = max(1, total_steps)
        self.average: list[torch.Tensor] | None = None

    @staticmethod
    def from_config(model: nn.Module, config: TrainConfig, total_steps: int) -> Lookahead | None:
        if not config.lookahead:
            return None
        return Lookahead(model, start=config.lookahead_start, every=config.lookahead_every,
                         decay=config.lookahead_decay, power=config.lookahead_power,
                         total_steps=total_steps)

    def _entries(self) -> list[torch.Tensor]:
        return [v for v in self.model.state_dict().values() if v.is_floating_point()]

    @torch.no_grad()
    def after_step(self, step: int, epoch: int) -> None:
        """``step``: optimizer steps done so far (1-based), ``epoch`` 0-based."""
        if epoch < self.start or step % self.every:
            return
        live = self._entries()
        if self.average is None:
            self.average = [v.detach().clone() for v in live]
            return
        rho = self.decay**self.every * (step / self.total_steps) ** self.power
        for avg, v in zip(self.average, live):
            avg.lerp_(v, 1 - rho)
            v.copy_(avg)

    @torch.no_grad()
    def end_epoch(self) -> None:
        if self.average is not None:
            for avg, v in zip(self.average, self._entries()):
                v.copy_(avg)

    def pack(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """The optimizer's state dict plus the average, as entries -1, -2, ... of its state."""
        if self.average is None:
            return optimizer_state
        state = dict(optimizer_state["state"])
        for j, avg in enumerate(self.average):
            state[-1 - j] = {self.KEY: avg}
        return {**optimizer_state, "state": state}

    def unpack(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """Take the average out of a packed state dict; return the optimizer's own part."""
        state = {int(k): v for k, v in optimizer_state["state"].items()}
        mine = sorted((k for k in state if k < 0), reverse=True)
        if mine:
            live = self._entries()
            if len(mine) != len(live):
                raise ValueError(f"lookahead state holds {len(mine)} tensors, the model "
                                 f"{len(live)}")
            self.average = [state.pop(k)[self.KEY].to(v.device, v.dtype).clone()
                            for k, v in zip(mine, live)]
        return {**optimizer_state, "state": state}
