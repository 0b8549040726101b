"""An exponential moving average of the weights (``--ema DECAY``), as timm's ``ModelEmaV3``.

After every optimizer step, every floating entry of the state dict (weights and BatchNorm
statistics) moves a ``1 - decay`` share of the way to the trained network's:
``ema = decay * ema + (1 - decay) * w``; integer entries (BatchNorm's batch counter) are
copied. With ``--ema-warmup`` the decay of step t is ``min(decay, 1 - (1 + t) ** -2/3)``
(timm's warm-up, gamma 1, power 2/3), so a short run is not dominated by its first weights.

When it is on, the averaged network is the one evaluated each epoch, selected (the best
checkpoint), tested at the end and saved as the checkpoints' model weights, which is what
``evaluate``, ``predict``, ``export`` and ``--init-from`` read; the trained weights travel
beside them in the last checkpoint (``train/`` tensors) so that a resume continues both
exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """The averaged copy of ``model`` (kept in eval mode, without gradients) and its update."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval()
        for m in self.module.modules():  # hooks a probe put on the model are not the copy's
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
        self.module.requires_grad_(False)
        self._pairs(model)

    @staticmethod
    def from_config(model: nn.Module, config: Any) -> WeightEMA | None:
        if not config.ema:
            return None
        return WeightEMA(model, config.ema, config.ema_warmup)

    def _pairs(self, model: nn.Module) -> None:
        mine, theirs = self.module.state_dict(), model.state_dict()
        self._floats = [(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point()]
        self._others = [(mine[k], theirs[k]) for k in mine if not mine[k].is_floating_point()]

    def decay_at(self, step: int) -> float:
        """The decay of update number ``step`` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1 - (1 + step) ** (-2 / 3)))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based, counted over the whole run: resume-exact)."""
        weight = 1 - self.decay_at(step)
        torch._foreach_lerp_([e for e, _ in self._floats], [w for _, w in self._floats], weight)
        for e, w in self._others:
            e.copy_(w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """The average a checkpoint saved; ``model``: the trained network, as restored."""
        self.module.load_state_dict(state)
        self._pairs(model)
