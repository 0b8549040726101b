"""Resuming a run: its saved config merged with what the user changed, the checks that
refuse a resume which would silently change the run, and where a resume may not go on."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vggkit.config import FIELDS, TrainConfig, apply_overrides
from vggkit.errors import UsageError
from vggkit.runfolder import RunFolder
from vggkit.training.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger("vggkit.train")

# Schedules that place every step relative to the run's total length.
TOTAL_DEPENDENT_SCHEDULES = ("onecycle", "cosine", "triangle")


def resolve_resume(config: TrainConfig, explicit: set[str] | None = None
                   ) -> tuple[TrainConfig, Checkpoint | None]:
    """With --resume RUN: the run's saved config, overridden by the options the user gave
    (``explicit``, from the CLI; from the API, those that differ from the defaults), e.g.
    more --epochs; and its last checkpoint."""
    run = RunFolder(config.resume)
    if not run.config_path.is_file():
        raise UsageError(f"--resume {run}: not a run folder (no config.yaml)")
    saved = run.read_config()
    defaults = TrainConfig()
    given = explicit if explicit is not None else {
        name for name in FIELDS if getattr(config, name) != getattr(defaults, name)}
    changed = {name: getattr(config, name) for name in given if name not in ("resume", "out")}
    merged = apply_overrides(TrainConfig(), {**saved, **changed}, source=str(run.config_path))
    merged = dataclasses.replace(merged, resume=str(run.path), out=str(run.path))
    if not run.checkpoint("last").is_file():
        # Stopped before its first checkpoint: nothing to continue, so start it again.
        log.warning("--resume %s: no checkpoint yet; training it from the start", run)
        return merged, None
    checkpoint = load_checkpoint(run.checkpoint("last"))
    check_resume_changes(checkpoint.meta.get("config", {}), merged)
    return merged, checkpoint


def check_world_size(meta: dict[str, Any], world_size: int, run: str | None) -> None:
    """A mid-epoch checkpoint counts the batches every process has done: under another
    number of processes the skipped part of the epoch would be wrong."""
    saved = meta.get("world_size", 1)
    if meta.get("batch", 0) and saved != world_size:
        raise UsageError(
            f"--resume {run}: it stopped mid-epoch (epoch {meta['epoch'] + 1}, batch "
            f"{meta['batch']}) under {saved} process(es); resume it with {saved}, not "
            f"{world_size}: the batches already done are counted per process")


def check_resume_changes(trained: dict[str, Any], resumed: TrainConfig) -> None:
    """Refuse a resume that would silently change the learning-rate curve or the data
    position: the checkpoint counts steps in batches of its own size, and one-cycle,
    cosine, triangle and lookahead place every step relative to the run's total length."""
    old_batch = trained.get("batch_size", resumed.batch_size)
    if old_batch != resumed.batch_size:
        raise UsageError(
            f"--batch-size {resumed.batch_size}: the run was trained with batch size "
            f"{old_batch}, and its position, schedule and data order count batches of that "
            "size; resume it with its own batch size, or start a new run (--init-from)")
    if trained.get("time_budget") != resumed.time_budget:
        planned = trained.get("time_budget")
        raise UsageError(
            f"--time-budget {resumed.time_budget}: the run was "
            + (f"planned once for {planned} ({trained.get('epochs')} epochs), and a resume keeps "
               "that plan" if planned else "not trained to a budget")
            + "; resume it without --time-budget, or start a new run")
    old_epochs = trained.get("epochs", resumed.epochs)
    if old_epochs == resumed.epochs:
        return
    reason = (f"--schedule {resumed.schedule}" if resumed.schedule in TOTAL_DEPENDENT_SCHEDULES
              else "--lookahead" if resumed.lookahead else None)
    if reason:
        raise UsageError(
            f"--epochs {resumed.epochs}: the run was planned for {old_epochs} epochs, and "
            f"{reason} shapes every step by the total, so continuing to {resumed.epochs} "
            "would change the curve it already followed; train a new run with "
            f"--epochs {resumed.epochs} instead (a constant, step, plateau or time-decay "
            "schedule can be extended)")
