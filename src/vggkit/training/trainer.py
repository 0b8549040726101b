"""The training loop: config -> dataset -> loader -> model -> steps -> run folder.

Read it top to bottom as airbench's: :func:`train` sets a :class:`Trainer` up (processes,
data, model and optimizer, restore), runs its epochs (:meth:`Trainer.train_epoch`, then
:meth:`Trainer.end_epoch`: validation, best checkpoint, schedule, metrics) and finishes
(:meth:`Trainer.finish`: the final test and summary.json). One code path serves
single-process and torchrun runs and every recipe.

Selection never sees the test set: the best checkpoint, the plateau schedule and early
stopping act on the validation split held out of the training images; with
``--val-split 0`` nothing is selected and the test curve is recorded for monitoring only.
Resume is exact: the data order and augmentation are functions of (seed, epoch), the
learning rate a function of the iteration, and the RNG and optimizer states are saved.
The report is not this layer's business: the caller writes it (``vggkit.workflow``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import platform
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vggkit import __version__
from vggkit.config import TrainConfig, check_tta_translate, parse_duration
from vggkit.errors import CheckpointError, VggkitError
from vggkit.models import count_parameters, get_architecture
from vggkit.runfolder import RunFolder, default_run_name
from vggkit.training import balance, budget
from vggkit.training import distributed as D
from vggkit.training.checkpoint import Checkpoint, save_checkpoint
from vggkit.training.ema import WeightEMA
from vggkit.training.engine import Engine, TrainStep, cpu_name, make_engine
from vggkit.training.finetune import FeatureFreeze
from vggkit.training.health import (BN_PROBE_IMAGES, BN_PROBE_MIN_STEPS, Finding,
                                    HealthMonitor, check_bn_stats)
from vggkit.training.mixing import Mixing
from vggkit.training.optim import (
    Lookahead,
    Schedule,
    build_optimizer,
    set_lr,
    settle_fused_state,
)
from vggkit.training.precise_bn import batchnorms, recompute_bn_stats, statistics_put_back
from vggkit.training.progress import Progress
from vggkit.training.resume import check_world_size, resolve_resume
from vggkit.training.scoring import collect_logits, score
from vggkit.training.setup import build_model, load_data
from vggkit.training.stopflag import StopFlag
from vggkit.training.tracking import Trackers

log = logging.getLogger("vggkit.train")

class TrainingInterrupted(VggkitError):
    """SIGINT/SIGTERM: a checkpoint was written; the message holds the resume command."""

    exit_code = 130


class NonFiniteLoss(VggkitError):
    pass


# ----------------------------------------------------------------------------- entry point
def train(config: TrainConfig, *, progress: bool = True, explicit: set[str] | None = None,
          command: str | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (the fields of summary.json).
    ``explicit``: the options the user set (the CLI passes them), which override a resumed
    run's saved config even where they equal the defaults. ``command``: the command line,
    recorded in summary.json."""
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    budget_start = budget.clock()
    checkpoint = None
    if config.resume:
        config, checkpoint = resolve_resume(config, explicit)
    trainer = Trainer(config, checkpoint, progress=progress)
    if command and trainer.main:
        trainer.run.record_start(command, resuming=checkpoint is not None)
    if config.time_budget and checkpoint is None:  # planned once: a resume keeps the plan
        trainer.plan_budget(budget_start)
    if trainer.state.stopped_early:
        log.info("--resume %s: it stopped early at epoch %d of %d (no better validation "
                 "accuracy for %d epochs): nothing to train; to go on, resume with a larger "
                 "--early-stop", config.resume, trainer.state.epoch,
                 config.epochs, trainer.state.stale_epochs)
    with StopFlag() as stop:
        last = trainer.state.epoch if trainer.state.stopped_early else trainer.config.epochs
        for epoch in range(trainer.state.epoch, last):
            totals = trainer.train_epoch(epoch, stop)
            trainer.end_epoch(epoch, totals)
            if trainer.state.stopped_early:
                break
    return trainer.finish(wall_start, load_start, command)


# ----------------------------------------------------------------------------- the trainer
@dataclass
class LoopState:
    """Where the loop stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of epoch ``epoch`` done (a mid-epoch checkpoint)
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    stale_epochs: int = 0
    partial_totals: dict[str, Any] | None = None
    train_seconds: float = 0.0
    stopped_early: bool = False


@dataclass
class EpochTotals:
    """Device-side sums, read once per display update or epoch (no per-step sync)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int = 0
    seconds: float = 0.0

    @staticmethod
    def start(device: torch.device, partial: dict[str, Any] | None) -> EpochTotals:
        """Zeros, or the sums a mid-epoch checkpoint saved."""
        totals = EpochTotals(torch.zeros((), device=device, dtype=torch.float64),
                             torch.zeros((), device=device, dtype=torch.int64))
        if partial:
            totals.loss_sum += partial["loss_sum"]
            totals.correct += partial["correct"]
            totals.count, totals.seconds = partial["count"], partial["seconds"]
        return totals

    def saved(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.item(), "correct": int(self.correct.item()),
                "count": self.count, "seconds": self.seconds}

    def running_loss(self) -> float:
        return self.loss_sum.item() / max(1, self.count)


class Trainer:
    """One run: built by ``__init__`` (setup), driven by :func:`train`."""

    def __init__(self, config: TrainConfig, checkpoint: Checkpoint | None, *,
                 progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.engine = make_engine(config.device, config.precision, config.channels_last,
                                  config.compile, config.threads)
        self.dist = D.init_distributed(self.engine.device)
        self.engine.device = D.local_device(self.engine.device, self.dist)
        self.main = self.dist.is_main
        if not self.main:
            logging.getLogger("vggkit").setLevel(logging.WARNING)
        self.lr = config.lr * (self.dist.world_size if config.scale_lr == "linear" else 1)
        self.run = self._open_run_folder(checkpoint is not None)
        log.info("device %s, precision %s (%s)%s", self.engine.device, self.engine.precision,
                 self.engine.precision_reason,
                 f", {self.dist.world_size} processes" if self.dist.enabled else "")
        self.data = load_data(config, self.engine, self.dist, progress)
        check_tta_translate(config, self.data.image_size)
        log.info("validation: %s", self.data.val_source)
        self.arch = get_architecture(config.model)
        self.model, self.params = build_model(config, self.data, self.engine, self.dist,
                                              fresh=checkpoint is None)
        self.ema = WeightEMA.from_config(self.model, config)  # of the initial weights
        self.mixing = Mixing.from_config(config, self.dist.rank)
        self.health = HealthMonitor(self.model, model_name=config.model,
                                    optimizer=config.optimizer, lr=config.lr,
                                    num_classes=self.data.num_classes,
                                    probe_relus=not config.compile,
                                    momentum=config.momentum,
                                    features_lr_scale=config.features_lr_scale
                                    ) if config.health else None
        self.optimizer = build_optimizer(self.model, config, self.lr)
        # after the optimizer, which holds the frozen features too; before DDP wraps the model
        self.freeze = FeatureFreeze.from_config(self.model, config, self.dist)
        self.params = count_parameters(self.model)  # --freeze-features: they are non-trainable
        self.class_counts = balance.class_counts(self.data.dataset.y_train, self.data.num_classes)
        self._warn_imbalance()
        self.budget_plan = checkpoint.meta.get("time_budget") if checkpoint else None
        self._build_schedules()
        self.state = LoopState()
        self.bn_stats_current = False  # --precise-bn's statistics match the weights
        self.run_resumed = checkpoint is not None
        if checkpoint is not None:
            self.restore(checkpoint)
        else:  # dropout streams differ per process; a resume restores its own
            torch.manual_seed(config.seed * 1000 + self.dist.rank + 1)
        self.net = self._wrap(self.model)
        # what is evaluated, selected, tested and saved: the --ema average, or the network
        self.evaluated = self.engine.maybe_compile(self.ema.module) if self.ema else self.net
        weight = (balance.class_weights(config.class_weights, self.class_counts,
                                        list(self.data.dataset.classes)).to(self.engine.device)
                  if config.class_weights else None)
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
        self.step = TrainStep(self.net, self.optimizer, loss_fn, self.engine, config.grad_accum)
        if checkpoint is not None and self.step.scaler is not None and checkpoint.meta.get("scaler"):
            self.step.scaler.load_state_dict(checkpoint.meta["scaler"])  # fp16: its loss scale
        self.meta = self._checkpoint_meta()
        if self.main:
            self.run.write_config(config.to_yaml())
        self.trackers = Trackers(config, self.run.path, enabled=self.main)
        self._restore_metrics(resuming=checkpoint is not None)

    def _warn_imbalance(self) -> None:
        line = balance.imbalance_warning(self.class_counts, list(self.data.dataset.classes),
                                         self.config)
        if line and self.health is not None:
            self.health.findings.append(Finding("unbalanced", line, 0))
            if self.main:
                log.warning("%s", self.health.findings[-1])

    def plan_budget(self, started: float) -> None:
        """--time-budget: time the step here, then size the run (and its schedules) to fit."""
        c = self.config
        plan = budget.make_plan(self, parse_duration(c.time_budget), started, c.time_budget)
        self.budget_plan = D.broadcast_object(plan.to_dict() if self.main else None, self.dist)
        self.config = c.replace(epochs=self.budget_plan["epochs"])
        self._build_schedules()
        self.meta = self._checkpoint_meta()
        if self.main:
            self.run.write_config(self.config.to_yaml())
            log.info("%s", budget.BudgetPlan(**self.budget_plan).line())

    def _build_schedules(self) -> None:
        """The rate schedule and lookahead, built for every step the run will take (a
        --time-budget plan may cut the last epoch short)."""
        steps = len(self.data.train)
        cut = steps - self.epoch_steps(self.config.epochs - 1)
        self.schedule = Schedule.from_config(self.config, self.lr, steps, cut)
        self.lookahead = Lookahead.from_config(self.model, self.config,
                                               steps * self.config.epochs - cut)

    def epoch_steps(self, epoch: int) -> int:
        """The batches ``epoch`` trains: all of them, but in the last epoch of a
        --time-budget plan that cut it short."""
        last = budget.last_epoch_steps(self.budget_plan)
        return last if last and epoch == self.config.epochs - 1 else len(self.data.train)

    def _open_run_folder(self, has_checkpoint: bool) -> RunFolder:
        """Rank 0 creates it; the others learn its path. ``--resume`` of a run stopped before
        its first checkpoint trains it again from the start, in the same folder."""
        config = self.config
        out = None
        if self.main:
            path = config.out or default_run_name(config.dataset, config.model)
            restart = bool(config.resume) and not has_checkpoint
            out = RunFolder(path).create(resuming=has_checkpoint,
                                         overwrite=config.overwrite or restart)
        return RunFolder(D.broadcast_object(str(out) if out else None, self.dist))

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.engine.device.index]
                if self.engine.device.type == "cuda" else None)
        return self.engine.maybe_compile(net)

    def _checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint carries besides the loop state."""
        c, d = self.config, self.data
        return {
            "config": c.to_dict(),
            "classes": list(d.dataset.classes),
            "mean": d.mean,
            "std": d.std,
            "image_shape": [d.channels, d.image_size, d.image_size],
            "photo": d.photo,
            "model": {"name": c.model, "head": c.head or self.arch.default_head,
                      "num_classes": d.num_classes, "in_channels": d.channels,
                      "input_size": d.image_size, "dropout": c.dropout},
            "dataset": {"name": c.dataset, "source": getattr(d.dataset, "source", ""),
                        "train": len(d.dataset.x_train), "test": len(d.dataset.x_test),
                        "val": len(d.dataset.x_val) if d.has_val else 0},
            "world_size": self.dist.world_size,
            "precision": self.engine.precision,  # as resolved: evaluate's default
            "time_budget": self.budget_plan,
        }

    # --- restore
    def restore(self, checkpoint: Checkpoint) -> None:
        """Weights, optimizer (with the lookahead average), schedule, loop state and RNG."""
        c, meta = self.config, checkpoint.meta
        try:
            self.model.load_state_dict(checkpoint.training_state or checkpoint.model_state)
            if self.ema is not None:  # a run that had no --ema starts its average here
                self.ema.load(checkpoint.model_state, self.model)
            state = checkpoint.optimizer_state
            if self.lookahead is not None:
                state = self.lookahead.unpack(state)
            else:  # a lookahead average saved by a run that had it on: not ours to load
                state = {**state, "state": {k: v for k, v in state["state"].items()
                                            if int(k) >= 0}}
            self.optimizer.load_state_dict(state)
            settle_fused_state(self.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"--resume {c.resume}: its checkpoint does not fit {c.model} with "
                f"{self.data.num_classes} classes at {self.data.channels}x{self.data.image_size}"
                f"x{self.data.image_size} ({first}); resume with the run's own "
                "--model/--head/--dataset/--image-size") from None
        self.schedule.state = meta["schedule_state"]
        self.state = LoopState(epoch=meta["epoch"], batch=meta.get("batch", 0),
                               best=meta["best"], stale_epochs=meta.get("stale_epochs", 0),
                               partial_totals=meta.get("partial_totals"))
        # An early stop holds on resume unless the resume changed --early-stop to go on.
        self.state.stopped_early = bool(meta.get("stopped_early") and c.early_stop
                                        and self.state.stale_epochs >= c.early_stop)
        check_world_size(meta, self.dist.world_size, c.resume)
        if meta.get("world_size", 1) == self.dist.world_size:
            self._restore_rng(checkpoint.rng)
        log.info("resuming %s at epoch %d%s", self.run, self.state.epoch + 1,
                 f", batch {self.state.batch}" if self.state.batch else "")

    def _restore_rng(self, saved: dict[str, torch.Tensor]) -> None:
        """This rank's own RNG state (dropout masks differ per rank, and stay so on resume);
        a checkpoint from before per-rank states gives the other ranks fresh seeded streams."""
        mine = rank_rng(saved, self.dist.rank)
        if mine:
            set_rng_state(mine, self.engine.device)
        else:
            torch.manual_seed(self.config.seed * 1000 + self.dist.rank + 1 + 7919 * self.state.epoch)

    def _rank_rngs(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG state for a checkpoint (a collective: every rank calls it)."""
        states = D.all_gather_object(rng_state(self.engine.device), self.dist)
        return {(k if r == 0 else f"{k}@{r}"): v for r, state in enumerate(states)
                for k, v in state.items()}

    def _restore_metrics(self, resuming: bool) -> None:
        """On resume, keep the metrics lines the checkpoint covers and the time they took."""
        if not resuming:
            return
        upto = self.state.epoch
        rows = self.run.keep_metrics_through(upto) if self.main else \
            [r for r in self.run.read_metrics() if r.get("epoch", 0) <= upto]
        self.state.train_seconds = sum(r.get("epoch_seconds", 0.0) for r in rows)

    def write_checkpoint(self, name: str, epoch: int, batch: int = 0,
                         totals: dict[str, Any] | None = None, with_state: bool = True,
                         rngs: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 writes; ``rngs``: every rank's RNG state (:meth:`_rank_rngs`), else its own."""
        if not self.main:
            return
        s = self.state
        meta = {**self.meta, "epoch": epoch, "batch": batch, "best": s.best,
                "stale_epochs": s.stale_epochs, "stopped_early": s.stopped_early,
                "scaler": self.step.scaler.state_dict() if self.step.scaler is not None else None,
                "schedule_state": self.schedule.state,
                "partial_totals": totals}
        optimizer_state = None
        if with_state:
            optimizer_state = self.optimizer.state_dict()
            if self.lookahead is not None:
                optimizer_state = self.lookahead.pack(optimizer_state)
        kept = self.ema.state_dict() if self.ema else self.model.state_dict()
        trained = self.model.state_dict() if self.ema and with_state else None
        save_checkpoint(self.run.checkpoint(name), kept, meta, optimizer_state,
                        (rngs or rng_state(self.engine.device)) if with_state else None, trained)

    # --- one epoch
    def train_epoch(self, epoch: int, stop: StopFlag) -> EpochTotals:
        """Every batch of ``epoch`` (from the saved batch when resuming mid-epoch)."""
        c, steps, full = self.config, self.epoch_steps(epoch), len(self.data.train)
        self.net.train()
        self.bn_stats_current = False
        frozen = self.freeze.apply(epoch)  # a function of the epoch: resume-exact
        settle_fused_state(self.optimizer)
        if self.arch.whiten_kernel and c.whiten_bias_epochs is not None and not frozen:
            self.model.features[0].bias.requires_grad_(epoch < c.whiten_bias_epochs)
        resumed = epoch == self.state.epoch and self.state.batch
        first = self.state.batch if resumed else 0
        totals = EpochTotals.start(self.engine.device,
                                   self.state.partial_totals if resumed else None)
        bar = Progress(steps, first, epoch + 1, c.epochs, c.batch_size * self.dist.world_size,
                       enabled=self.progress and self.main, log_every=c.log_every)
        tick = time.perf_counter()
        # The loader draws the same permutation and augmentation as a full pass, so a
        # mid-epoch resume starting at the next batch sees identical batches.
        batches = self.data.train.epoch(epoch, start=first)
        for batch, (images, labels) in enumerate(itertools.islice(batches, steps - first),
                                                 start=first):
            it = epoch * full + batch
            set_lr(self.optimizer, self.schedule.lr_at(it))
            mix = None
            if self.mixing is not None:
                images, mix = self.mixing(images, labels, it)
            with (self.health.watch_step(batch == first, it == 0) if self.health
                  else nullcontext()):
                loss, correct = self.step(images, labels, mix)
            if self.health and batch == steps - 1:
                self.health.after_last_step()
            if self.lookahead is not None:
                self.lookahead.after_step(it + 1, epoch)
            if self.ema is not None:
                self.ema.update(it + 1)
            totals.loss_sum += loss.double() * len(labels)
            totals.correct += correct
            totals.count += len(labels)
            if bar.due() or batch == steps - 1:
                self._check_finite(totals.running_loss(), epoch, batch)
                bar.show(batch + 1, totals.running_loss(),
                         totals.correct.item() / max(1, totals.count))
            # Agreed across processes every step: a signal that reached only some ranks
            # must not leave the others waiting in the next all-reduce.
            if D.any_rank(stop.signal is not None, self.dist):
                totals.seconds += time.perf_counter() - tick
                bar.close()
                self._interrupt(stop.signal or signal.SIGTERM, epoch, batch, totals)
        batches.close()  # an epoch cut short (--time-budget) leaves the rest unread
        if self.lookahead is not None:
            self.lookahead.end_epoch()
        bar.close()
        totals.seconds += time.perf_counter() - tick
        return totals

    def _check_finite(self, loss: float, epoch: int, batch: int | None = None) -> None:
        if math.isfinite(loss):
            return
        where = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else "")
        advice = (self.health.nonfinite_advice(self.engine.precision) if self.health else
                  f"lower --lr (now {self.lr:g}) or use --precision fp32")
        # bf16/fp16 can tip a run that fp32 carries through (the classic VGG-16 at epoch 46):
        # continuing the last checkpoint in fp32 keeps the epochs already trained
        keep = (f"; to keep the epochs done, continue it in fp32: vggkit train --resume "
                f"{self.run} --precision fp32" if self.engine.precision != "fp32" else "")
        raise NonFiniteLoss(f"loss became {loss} at {where}: {advice}; the last good "
                            f"checkpoint is {self.run.checkpoint('last')}{keep}")

    def _interrupt(self, signum: int, epoch: int, batch: int, totals: EpochTotals) -> None:
        self.write_checkpoint("last", epoch, batch + 1, totals.saved(), rngs=self._rank_rngs())
        D.shutdown(self.dist)
        raise TrainingInterrupted(
            f"interrupted by {signal.Signals(signum).name} at epoch {epoch + 1}, batch "
            f"{batch + 1}; checkpoint written. Resume with: vggkit train --resume {self.run}")

    # --- end of epoch: evaluation, selection, checkpoints
    def end_epoch(self, epoch: int, totals: EpochTotals) -> dict[str, Any]:
        """Sum the epoch over processes, evaluate, select on validation, write the metrics
        line and checkpoints."""
        c, s = self.config, self.state
        sums = torch.tensor([totals.loss_sum.item(), float(totals.correct.item()),
                             float(totals.count)], dtype=torch.float64)
        D.all_reduce_sum(sums, self.dist)
        train_loss, train_acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        self._check_finite(train_loss, epoch)
        s.train_seconds += totals.seconds
        split = "val" if self.data.has_val else "test"
        self.precise_bn(self.ema.module if self.ema else self.model)
        loss, acc = self.evaluate_sharded(self.data.per_epoch)  # the --ema average if on
        improved = self.data.has_val and acc > s.best["acc"]
        if improved:
            s.best, s.stale_epochs = {"acc": acc, "epoch": epoch + 1}, 0
        elif self.data.has_val:
            s.stale_epochs += 1
        if self.data.has_val:  # selection acts on validation only, never on the test split
            if self.schedule.end_epoch(acc):
                log.info("validation accuracy has not improved for %d epochs: learning rate "
                         "x%g", c.plateau_patience, c.gamma)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                  f"{split}_loss": loss, f"{split}_acc": acc,
                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": totals.seconds,
                  "images_per_second": sums[2].item() / max(1e-9, totals.seconds),
                  "train_samples": int(sums[2].item()), "elapsed_seconds": s.train_seconds}
        s.epoch, s.batch, s.partial_totals = epoch + 1, 0, None
        # Decided before the checkpoint is written, so that a resume knows the run stopped.
        s.stopped_early = bool(c.early_stop and s.stale_epochs >= c.early_stop)
        self._save_epoch(record, epoch, improved, self._rank_rngs())
        if (epoch == 0 and self.health is not None and not c.precise_bn and self.data.has_val
                and len(self.data.train) >= BN_PROBE_MIN_STEPS):
            self._probe_bn_stats(acc, epoch)
        log.info("epoch %d/%d  loss %.4f  acc %.2f%%  %s_loss %.4f  %s_acc %.2f%%%s  lr %.4g  "
                 "%.1fs  %s img/s", epoch + 1, c.epochs, train_loss, 100 * train_acc, split,
                 loss, split, 100 * acc, " (monitoring only)" if split == "test" else "",
                 record["lr"], totals.seconds, f"{record['images_per_second']:,.0f}")
        if s.stopped_early:
            log.info("early stop: no better validation accuracy for %d epochs", s.stale_epochs)
        return record

    def precise_bn(self, model: nn.Module) -> None:
        """--precise-bn: the BatchNorm statistics evaluation will use, computed again, unless
        this process already did for these weights (the last epoch's evaluation)."""
        if self.data.bn_stats is not None and not self.bn_stats_current:
            batches = (images for images, _ in self.data.bn_stats.epoch(0))
            recompute_bn_stats(model, batches, self.engine.autocast(), self.dist,
                               self._kept_norms())
            self.bn_stats_current = True  # until the next step moves the weights

    def _kept_norms(self) -> tuple[str, ...]:
        """Frozen features keep their BatchNorm statistics (--freeze-features)."""
        return ("features",) if self.freeze.frozen else ()

    def _probe_bn_stats(self, running_acc: float, epoch: int) -> None:
        """Health, after the first epoch: would statistics computed again validate better?
        The running ones are put back, so the run goes on unchanged."""
        model, keep = self.ema.module if self.ema else self.model, self._kept_norms()
        if not batchnorms(model, keep) or self.data.bn_loader is None:
            return
        with statistics_put_back(model, keep):
            loader = self.data.bn_loader(BN_PROBE_IMAGES)
            images = recompute_bn_stats(model, (x for x, _ in loader.epoch(0)),
                                        self.engine.autocast(), self.dist, keep)
            _, precise_acc = self.evaluate_sharded(self.data.per_epoch)
        count = min(BN_PROBE_IMAGES, images * self.dist.world_size)
        found = self.health.note(check_bn_stats(running_acc, precise_acc, count, epoch + 1))
        if found is not None and self.main:
            log.warning("%s", found)

    def evaluate_sharded(self, loader) -> tuple[float, float]:
        """(loss, accuracy) of a split each process holds a shard of."""
        logits, labels = collect_logits(self.evaluated, loader, self.engine)
        sums = torch.tensor([nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
                             float((logits.argmax(1) == labels).sum().item()),
                             float(len(labels))], dtype=torch.float64)
        D.all_reduce_sum(sums, self.dist)
        return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()

    def _save_epoch(self, record: dict[str, Any], epoch: int, improved: bool,
                    rngs: dict[str, torch.Tensor]) -> None:
        if not self.main:
            return
        self.run.append_metrics(record)
        if self.health is not None:
            for finding in self.health.end_epoch(self.run.read_metrics()):
                log.warning("%s", finding)
        self.trackers.epoch(record)
        self.write_checkpoint("last", epoch + 1, rngs=rngs)
        if improved:
            self.write_checkpoint("best", epoch + 1, with_state=False)

    # --- finish
    def finish(self, wall_start: float, load_start: tuple[float, ...],
               command: str | None) -> dict[str, Any]:
        """The final test of the last weights (every rank on the whole test set), then
        summary.json and predictions.npz."""
        c = self.config
        tick = time.perf_counter()
        tested = self.ema.module if self.ema else self.model
        self.precise_bn(tested)  # done already if the last epoch ran in this process
        logits, labels = collect_logits(tested, self.data.test, self.engine, tta=c.tta,
                                        translate=c.tta_translate)
        test_seconds = time.perf_counter() - tick
        test = {**score(logits, labels), "balanced_acc": balance.mean_recall(logits, labels)}
        digests = D.all_gather_object(weights_digest(tested), self.dist)
        if len(set(digests)) > 1:
            log.warning("processes ended with different weights: %s", digests)
        summary = self._summary(test, test_seconds, digests, wall_start, load_start, command)
        if self.main:
            self.run.write_predictions(logits.numpy(), labels.numpy())
            self.run.write_summary(summary)
            self.trackers.finish(summary)
            log.info("test loss %.4f  test acc %.2f%%%s%s  time of learning %.1fs  wall time "
                     "%.1fs  -> %s", test["loss"], 100 * test["acc"],
                     f"  top-5 {100 * test['top5_acc']:.2f}%" if test["top5_acc"] else "",
                     " (TTA)" if c.tta else "", self.state.train_seconds,
                     summary["wall_seconds"], self.run)
        D.shutdown(self.dist)
        return summary

    def _summary(self, test: dict[str, Any], test_seconds: float, digests: list[str],
                 wall_start: float, load_start: tuple[float, ...],
                 command: str | None) -> dict[str, Any]:
        c, s, history = self.config, self.state, self.run.read_metrics()
        seconds = sum(r["epoch_seconds"] for r in history)
        has_val = self.data.has_val
        env = environment_info(self.engine)
        starts = self.run.read_starts()
        made_by = [r["command"] for r in starts if not r.get("resume")]
        return {
            "run": str(self.run),
            # the command that made the run; a chained run's pieces follow in "starts"
            "command": made_by[-1] if made_by else command,
            "starts": starts,
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "balanced_acc": test["balanced_acc"],
            **({"top5_acc": test["top5_acc"]} if test["top5_acc"] is not None else {}),
            "tta": c.tta,
            "tta_translate": c.tta_translate if c.tta else 0,
            "test_seconds": test_seconds,
            "test_weights": "last",
            "best_epoch": s.best["epoch"] if has_val else None,
            "best_val_acc": s.best["acc"] if has_val else None,
            "val_source": self.data.val_source,
            "val_size": len(self.data.dataset.x_val) if has_val else 0,
            "epochs_completed": history[-1]["epoch"] if history else 0,
            "stopped_early": s.stopped_early,
            "train_seconds": s.train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "images_per_second": sum(r["epoch_seconds"] * r["images_per_second"]
                                     for r in history) / max(1e-9, seconds),
            "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
            "params": self.params,
            "model": self.meta["model"],
            "dataset": self.meta["dataset"],
            "skipped_images": len(getattr(self.data.dataset, "skipped", []) or []),
            "class_counts": {"train": self.class_counts,
                             "test": balance.class_counts(self.data.dataset.y_test,
                                                          self.data.num_classes)},
            "time_budget": self._budget_record(time.perf_counter() - wall_start),
            "health": [str(f) for f in self.health.findings] if self.health else None,
            "engine": {**self.engine.describe(), "world_size": self.dist.world_size},
            "weights_digest": digests[0],
            "rank_weights_digests": digests,
            "precision": self.engine.precision,
            "software": {k: env[k] for k in ("vggkit", "torch", "python", "numpy")},
            "machine": {k: v for k, v in env.items()
                        if k in ("platform", "cpu", "cpu_count", "hostname", "gpu")},
        }


    def _budget_record(self, wall: float) -> dict[str, Any] | None:
        """The plan beside what the run took (the report is timed by the caller)."""
        if not self.budget_plan:
            return None
        return {**self.budget_plan, "seconds_before_report": wall,
                "resumed": self.run_resumed}


# ----------------------------------------------------------------------------- helpers
def environment_info(engine: Engine) -> dict[str, Any]:
    info = {
        "vggkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes: equal digests, equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rank_rng(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s states in a checkpoint's (rank 0's under the plain names)."""
    if rank == 0:
        return {k: v for k, v in saved.items() if "@" not in k}
    return {k.split("@")[0]: v for k, v in saved.items() if k.endswith(f"@{rank}")}


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
