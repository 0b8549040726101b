"""Experiment trackers beside the run folder: TensorBoard (``--tensorboard``) and MLflow
(``--mlflow [URI]``, the ``mlflow`` extra). Both get every epoch's metrics line; MLflow also
the parameters (the resolved config), the final summary's figures and the run's files as
artifacts. The run folder stays the record: a tracker is a copy of it, and on resume the
same MLflow run continues (its id is kept in ``mlflow.json`` in the run folder).

MLflow's client API is used rather than its global "active run", so that a notebook or a
sweep that trains several runs in one process never logs into the wrong one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vggkit.errors import UsageError
from vggkit.runfolder import MLFLOW_RECORD, RunFolder

log = logging.getLogger("vggkit.train")

EXPERIMENT = "vggkit"
REPORT_FILES = ("report.html", "report.md", "confusion_matrix.csv", "confusion_matrix.png")


def tracking_uri(uri: str) -> str:
    """A bare folder (the default ``mlruns``) becomes a ``file:`` URI, absolute, so that
    the store does not move with the working directory."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).resolve().as_uri()


class MlflowTracker:
    def __init__(self, uri: str, run_path: Path, config: dict[str, Any]) -> None:
        record = run_path / MLFLOW_RECORD
        saved = json.loads(record.read_text()) if record.exists() else None
        self.uri = saved["tracking_uri"] if saved else tracking_uri(uri)
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its folder store unless told (it prefers a database); the issue's
            # default is that folder, which `mlflow ui --backend-store-uri ./mlruns` reads
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UsageError("--mlflow needs the mlflow package: pip install "
                             "'vggkit[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=self.uri)
        if saved:  # a resume: the same MLflow run goes on
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(EXPERIMENT))
        run = self.client.create_run(experiment_id, run_name=run_path.name,
                                     tags={"vggkit.run_folder": str(run_path.resolve())})
        self.run_id = run.info.run_id
        self.log_params(config)
        record.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_files(self, run_path: Path) -> None:
        run = RunFolder(run_path)
        files = [run.config_path, run.summary_path, run.metrics_path,
                 *(run_path / name for name in REPORT_FILES)]
        for path in files:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The trackers a run asked for, on the main process only."""

    def __init__(self, config, run_path: Path, enabled: bool) -> None:
        self.tensorboard = self.mlflow = None
        if not enabled:
            return
        if config.tensorboard:
            self.tensorboard = tensorboard_writer(run_path)
        if config.mlflow:
            self.mlflow = MlflowTracker(config.mlflow, run_path, config.to_dict())
            log.info("mlflow: run %s in %s", self.mlflow.run_id, self.mlflow.uri)

    def epoch(self, record: dict[str, Any]) -> None:
        step = record["epoch"]
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.tensorboard.add_scalar(key, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step)

    def finish(self, summary: dict[str, Any]) -> None:
        """The final figures; the run's files follow once the report is written
        (:func:`log_run_files`)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            keys = ("test_acc", "test_loss", "top5_acc", "balanced_acc", "best_val_acc",
                    "train_seconds", "wall_seconds", "images_per_second")
            self.mlflow.log_metrics({k: summary[k] for k in keys if summary.get(k) is not None},
                                    step=summary.get("epochs_completed", 0))


def log_run_files(run_path: Path) -> None:
    """After the report: the run folder's files as the MLflow run's artifacts, and the run
    marked finished (a run without ``--mlflow`` has no mlflow.json: nothing to do)."""
    record = run_path / MLFLOW_RECORD
    if not record.exists():
        return
    saved = json.loads(record.read_text())
    tracker = MlflowTracker(saved["tracking_uri"], run_path, {})
    tracker.log_files(run_path)
    tracker.close()


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: "
                         "pip install 'vggkit[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
