"""``vggkit lr-find``: the learning-rate range test (Smith 2017; fastai's ``lr_find``).

A throw-away copy of the run's model trains for a few hundred steps while the rate grows
exponentially from ``start_lr`` to ``end_lr``; the loss, smoothed and bias-corrected, is
recorded against the rate until it blows up. The suggestion is the rate where that loss
falls fastest, short of its minimum (where the next steps would start to diverge).
Nothing is saved but the plot: the weights are discarded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training import distributed as D
from vggkit.training.engine import TrainStep, make_engine
from vggkit.training.finetune import FeatureFreeze
from vggkit.training.optim import build_optimizer, set_lr
from vggkit.training.setup import build_model, load_data

log = logging.getLogger("vggkit.train")

SMOOTHING = 0.98  # exponential smoothing of the loss, as fastai
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed, bias-corrected
    suggestion: float


def lr_find(config: TrainConfig, *, steps: int = 200, start_lr: float = 1e-6,
            end_lr: float = 10.0, progress: bool = False) -> RangeTest:
    """Run the range test on ``config``'s data, model, optimizer and batch size."""
    if steps < 10 or not 0 < start_lr < end_lr:
        raise UsageError(f"lr-find: need --steps >= 10 and 0 < --start-lr < --end-lr, got "
                         f"{steps}, {start_lr:g}, {end_lr:g}")
    engine = make_engine(config.device, config.precision, config.channels_last, False,
                         config.threads)
    single = D.DistInfo()
    data = load_data(config, engine, single, progress)
    model, _ = build_model(config, data, engine, single, fresh=True)
    optimizer = build_optimizer(model, config, start_lr)
    FeatureFreeze.from_config(model, config).apply(0)  # as the run's first epoch trains
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                     engine)
    model.train()
    lrs, losses, average, best = [], [], 0.0, math.inf
    for i, (images, labels) in enumerate(batches(data.train, steps)):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        set_lr(optimizer, lr)
        loss = step(images, labels)[0].item()
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        if not math.isfinite(smoothed) or (i > 10 and smoothed > DIVERGED * best):
            break
        best = min(best, smoothed)
        lrs.append(lr)
        losses.append(smoothed)
    if len(lrs) < 5:
        raise UsageError(f"lr-find: the loss diverged within {len(lrs)} steps from "
                         f"--start-lr {start_lr:g}; start lower")
    return RangeTest(lrs, losses, suggest(lrs, losses))


def batches(loader, steps: int):
    """``steps`` training batches, through as many epochs of the loader as needed."""
    done, epoch = 0, 0
    while done < steps:
        for item in loader.epoch(epoch):
            yield item
            done += 1
            if done == steps:
                return
        epoch += 1


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The rate where the smoothed loss falls fastest against log(rate), before its
    minimum (fastai's "steep"); a tenth of the minimum's rate when it never falls."""
    at_min = min(range(len(losses)), key=losses.__getitem__)
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i])
              for i in range(at_min)]
    if not slopes or min(slopes) >= 0:
        return lrs[at_min] / 10
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[steepest]


def plot(result: RangeTest, path: str | Path) -> Path:
    """Loss against rate (log scale), the suggestion marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="C0")
    ax.axvline(result.suggestion, color="C1", linestyle="--",
               label=f"suggested --lr {result.suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    return path

