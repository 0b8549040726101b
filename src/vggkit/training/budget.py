"""``--time-budget 90m``: train to a time limit.

Lightning's ``max_time`` stops a run when the time is up and leaves its schedule unfinished.
Here the run is *sized* to the budget instead: before the first epoch a few training steps
and evaluation batches are timed on this machine (on the real model, whose weights,
optimizer and RNG states are put back afterwards), and the number of epochs is chosen so
that setup, every epoch (training, validation, checkpoints), the final test (with its TTA
views) and the report fit: whole epochs, then as many steps of one more as fit with its
evaluation (the last epoch is cut short rather than left out). The schedules that depend on
the total (onecycle, cosine, triangle, lookahead) are then built for exactly those steps, so
they finish.

The plan is made once, written into config.yaml (``epochs``) and every checkpoint, and a
resume never plans again: the run stays exact (a run killed before its first checkpoint has
trained nothing, and plans afresh when it restarts). The host's speed can change after the
plan; the summary records the plan beside what the run took.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from vggkit.training.optim import settle_fused_state

clock: Callable[[], float] = time.perf_counter  # tests replace it with a mocked clock
WARMUP_STEPS, TIMED_STEPS = 2, 4  # the first steps run slower (allocation, kernel choice)
TIMED_EVAL_BATCHES = 2
REPORT_SECONDS = 15.0  # reserved for the HTML report (plots, Grad-CAM of a few images)
PROBE = "budget-probe"  # the checkpoint written once to time the writing
SAFETY = 0.97  # of the time left: the host's speed varies


@dataclass
class BudgetPlan:
    budget_seconds: float
    epochs: int
    train_images: int  # per epoch, all processes
    images_per_second: float  # training, all processes
    eval_images_per_second: float
    epoch_seconds: float  # training + per-epoch evaluation + checkpoints
    setup_seconds: float  # spent before the first epoch, this measurement included
    final_seconds: float  # the final test (with TTA) and the report
    planned_seconds: float
    epoch_steps: int = 0  # batches of a whole epoch
    last_epoch_steps: int = 0  # batches of the last epoch when it is cut short; 0: it is whole

    def line(self) -> str:
        return (f"budget {format_minutes(self.budget_seconds)}: {epochs_text(asdict(self))} "
                f"({self.train_images:,} images an epoch) at ~{self.images_per_second:,.0f} "
                f"img/s (an epoch "
                f"~{format_minutes(self.epoch_seconds)} with validation and checkpoints; setup "
                f"{format_minutes(self.setup_seconds)}, final test, TTA and report "
                f"~{format_minutes(self.final_seconds)}): ends in "
                f"~{format_minutes(self.planned_seconds)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epochs_text(plan: dict[str, Any]) -> str:
    """A plan's epochs in words: "5 epochs", or "5 epochs and 40 of the 96 steps of one more"."""
    last = last_epoch_steps(plan)
    if not last:
        return f"{plan['epochs']} epochs"
    whole = plan["epochs"] - 1
    return (f"{whole} epoch{'s' if whole != 1 else ''} and {last} of the {plan['epoch_steps']} "
            "steps of one more")


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(step, loader, device: torch.device) -> float:
    """Seconds per training image over TIMED_STEPS steps after WARMUP_STEPS, with the
    model's weights, the optimizer's and loss scaler's states and the RNG put back."""
    model, optimizer = step.model, step.optimizer
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_scaler = step.scaler.state_dict() if step.scaler is not None else None
    saved_rng = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    model.train()
    batches = loader.epoch(0)
    seconds, images = 0.0, 0
    try:
        for i, (x, y) in enumerate(itertools.islice(batches, WARMUP_STEPS + TIMED_STEPS)):
            _sync(device)
            tick = clock()
            loss, _ = step(x, y)
            loss.item()  # waits for the step
            if i >= WARMUP_STEPS:
                seconds, images = seconds + clock() - tick, images + len(y)
    finally:
        batches.close()
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        settle_fused_state(optimizer)
        if saved_scaler is not None:
            step.scaler.load_state_dict(saved_scaler)
        torch.set_rng_state(saved_rng)
        if saved_cuda is not None:
            torch.cuda.set_rng_state(saved_cuda, device)
    if images == 0:  # an epoch shorter than the warm-up: time what there is
        raise ValueError("too few batches to time")
    return seconds / images


@torch.no_grad()
def time_evaluation(model, loader, engine) -> float:
    """Seconds per evaluated image (one view) over the first batches."""
    from vggkit.training.engine import predict_logits

    model.eval()
    batches = loader.epoch(0)
    seconds, images = 0.0, 0
    try:
        for x, _ in itertools.islice(batches, TIMED_EVAL_BATCHES):
            _sync(engine.device)
            tick = clock()
            predict_logits(model, x, engine).sum().item()
            seconds, images = seconds + clock() - tick, images + len(x)
    finally:
        batches.close()
    return seconds / max(1, images)


def time_checkpoint(trainer) -> float:
    """Seconds to write the run's checkpoint (a probe file, removed again)."""
    tick = clock()
    trainer.write_checkpoint(PROBE, 0)
    seconds = clock() - tick
    if trainer.main:
        trainer.run.checkpoint(PROBE).unlink(missing_ok=True)
    return seconds


def tta_views(tta: bool, translate: int) -> int:
    return 1 if not tta else 6 if translate else 2


def last_epoch_steps(plan: dict[str, Any] | None) -> int:
    """The batches of a plan's last epoch when it is cut short; 0 when it is whole (or there
    is no plan, or it was made before plans could cut)."""
    return int((plan or {}).get("last_epoch_steps") or 0)


def plan_epochs(budget: float, *, setup: float, epoch: float, final: float, fixed: float,
                steps: int) -> tuple[int, int]:
    """(epochs, last_epoch_steps): the whole epochs of ``epoch`` seconds that fit, then, if at
    least one step does, one more epoch cut to the steps that fit beside its ``fixed`` seconds
    (its validation and checkpoints); last_epoch_steps is 0 when there is none."""
    room = SAFETY * budget - setup - final
    whole = max(0, math.floor(room / epoch))
    step = (epoch - fixed) / steps
    cut = math.floor((room - whole * epoch - fixed) / step) if step > 0 else 0
    cut = min(cut, steps - 1)
    return (whole + 1, cut) if cut >= 1 else (whole, 0)


def make_plan(trainer, budget: float, setup_started: float, budget_text: str) -> BudgetPlan:
    """Time the trainer's step and evaluation and size its epochs to ``budget`` seconds,
    counted from ``setup_started`` (a :func:`clock` reading at the start of the run)."""
    from vggkit.errors import UsageError

    c, data, world = trainer.config, trainer.data, trainer.dist.world_size
    try:
        per_image = time_training_steps(trainer.step, data.train, trainer.engine.device)
    except ValueError:
        raise UsageError(f"--time-budget {budget_text}: an epoch has fewer than "
                         f"{WARMUP_STEPS + TIMED_STEPS} batches to time; give --epochs "
                         "instead") from None
    per_eval = time_evaluation(trainer.net, data.per_epoch, trainer.engine)
    save = time_checkpoint(trainer) * 1.5  # every epoch writes last, and often best
    train_images, steps = data.train.num_samples() * world, len(data.train)
    fixed = data.per_epoch.num_samples() * per_eval + save  # an epoch's, however many steps
    epoch = data.train.num_samples() * per_image + fixed
    final = (len(data.dataset.x_test) * tta_views(c.tta, c.tta_translate) * per_eval
             + (REPORT_SECONDS if c.report else 0.0))
    setup = clock() - setup_started
    epochs, last = plan_epochs(budget, setup=setup, epoch=epoch, final=final, fixed=fixed,
                               steps=steps)
    if epochs < 1:
        raise UsageError(
            f"--time-budget {budget_text}: one epoch takes ~{format_minutes(epoch)} here "
            f"(setup {format_minutes(setup)}, final test ~{format_minutes(final)}), and not "
            "one step of it fits; raise the budget, or train on fewer images (--subset) or a "
            "smaller --image-size")
    trained = (epochs - 1) * epoch + (fixed + (epoch - fixed) * last / steps if last else epoch)
    return BudgetPlan(budget, epochs, train_images, world / per_image, 1.0 / per_eval, epoch,
                      setup, final, setup + trained + final, steps, last)
