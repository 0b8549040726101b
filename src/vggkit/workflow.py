"""What a user's "train" means: train, then write the run's report.

The orchestration layer above training and evaluation (which never import each other's
way up): the CLI, the Python API (``vggkit.train``) and the sweep call :func:`train` here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vggkit.config import TrainConfig
from vggkit.errors import UsageError, VggkitError
from vggkit.result import TrainResult
from vggkit.runfolder import RunFolder
from vggkit.training import trainer
from vggkit.training.tracking import log_run_files

log = logging.getLogger("vggkit.train")


def train(config: TrainConfig, *, progress: bool = True, explicit: set[str] | None = None,
          command: str | None = None) -> TrainResult:
    """Train as ``config`` says (``vggkit.training.trainer.train``), then write the report
    (unless ``config.report`` is off; under torchrun only rank 0 writes) and hand the run's
    files to MLflow (``--mlflow``). Returns the summary as a :class:`TrainResult`: a dict,
    with the per-epoch ``history`` and ``report()`` for notebooks."""
    if config.lr == "auto" and not config.resume:
        config = with_found_lr(config, progress)
    summary = trainer.train(config, progress=progress, explicit=explicit, command=command)
    resolved = summary.get("run")
    if resolved and os.environ.get("RANK", "0") == "0":
        if wants_report(Path(resolved)):
            write_run_report(Path(resolved))
        log_run_files(Path(resolved))
    return TrainResult(summary)


def with_found_lr(config: TrainConfig, progress: bool) -> TrainConfig:
    """--lr auto: a learning-rate range test on a throw-away copy of the model, then the
    run's config with its suggestion (so config.yaml records the number used)."""
    from vggkit.training.lr_find import lr_find

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("--lr auto: run `vggkit lr-find` in one process first and pass its "
                         "suggestion as --lr under torchrun")
    found = lr_find(config, progress=progress)
    log.info("--lr auto: the range test suggests %.3g", found.suggestion)
    return config.replace(lr=found.suggestion)


def wants_report(run: Path) -> bool:
    """The run's own resolved config says (a resume's merged flags included)."""
    try:
        return bool(RunFolder(run).read_config().get("report", True))
    except VggkitError:
        return True


def write_run_report(out: Path) -> None:
    """The run is saved whatever happens here: a report failure is a warning."""
    from vggkit.evaluation.report import write_report

    try:
        paths = write_report([out], out)
        log.info("report: %s", paths[0] if isinstance(paths, (list, tuple)) else paths)
    except VggkitError as exc:
        log.warning("report not written: %s", exc)
    except Exception as exc:  # noqa: BLE001 - a report bug must not fail a finished run
        log.warning("report not written (a bug; `vggkit report %s --debug` shows it): %r",
                    out, exc)
