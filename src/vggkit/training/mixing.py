"""Mixup and CutMix on whole batches on the device (``--mixup ALPHA``, ``--cutmix ALPHA``), as
timm's ``Mixup`` in its batch mode.

Per step, with probability ``--mix-prob``, the batch is mixed with itself reversed
(image i with image N-1-i), one ratio ``lam`` ~ Beta(alpha, alpha) for the whole batch:

* mixup (Zhang et al. 2018): ``x = lam * x + (1 - lam) * x.flip(0)``;
* cutmix (Yun et al. 2019): a box of about ``1 - lam`` of the image, its center uniform and its
  sides clipped at the border, is pasted from the partner; ``lam`` is then corrected to the
  share of pixels kept (timm's ``correct_lam``).

With both on, each step is cutmix with probability ``--mix-switch-prob``, else mixup. The
target is ``lam`` of the image's label and ``1 - lam`` of its partner's (each smoothed by
``--label-smoothing`` and weighted by ``--class-weights`` as usual): the loss is
``lam * CE(y) + (1 - lam) * CE(y.flip(0))``, which equals the cross-entropy against the mixed
soft targets exactly, as the cross-entropy is linear in its target. The training accuracy
counts the label with the larger share.

The draws of step t come from a generator seeded by (seed, rank, t), so a resumed run mixes
its batches exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Mix:
    """How one batch was mixed: the partner labels and the share ``lam`` of the own label."""

    partner: torch.Tensor
    lam: float


@dataclass
class Mixing:
    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0
    rank: int = 0

    @staticmethod
    def from_config(config: Any, rank: int) -> Mixing | None:
        if not (config.mixup or config.cutmix):
            return None
        return Mixing(config.mixup, config.cutmix, config.mix_prob, config.mix_switch_prob,
                      config.seed, rank)

    def draw(self, step: int, height: int, width: int) -> tuple[str, float, tuple[int, ...]]:
        """("none" | "mixup" | "cutmix", lam, box (y0, y1, x0, x1)) for step ``step``."""
        rng = np.random.default_rng([self.seed, self.rank, step, 0x6D6978])
        if rng.random() >= self.prob:
            return "none", 1.0, ()
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        if not use_cutmix:
            return "mixup", float(rng.beta(self.mixup, self.mixup)), ()
        lam = float(rng.beta(self.cutmix, self.cutmix))
        ratio = np.sqrt(1 - lam)  # timm's rand_bbox: box sides sqrt(1 - lam) of the image's
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
        return "cutmix", float(lam), (int(y0), int(y1), int(x0), int(x1))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, Mix | None]:
        """The mixed batch (``images`` is changed in place) and how it was mixed."""
        kind, lam, box = self.draw(step, images.shape[-2], images.shape[-1])
        if kind == "none":
            return images, None
        partner = images.flip(0)
        if kind == "mixup":
            images.mul_(lam).add_(partner.mul_(1 - lam))
        else:
            y0, y1, x0, x1 = box
            images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        return images, Mix(labels.flip(0), lam)
