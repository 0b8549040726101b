"""The run folder: the one place that knows its files and how each is written and read.

Training writes a run through :class:`RunFolder`; evaluate, report, sweep and results read
it back through the same class, so a file's name or format lives here only::

    RUN/config.yaml                 the resolved TrainConfig
    RUN/metrics.jsonl               one JSON line per epoch (fsynced; a torn last line is skipped)
    RUN/summary.json                the final figures (written atomically)
    RUN/predictions.npz             test logits and labels of the final weights
    RUN/checkpoints/last.safetensors, best.safetensors
    RUN/report.html, report.md      written by the report after training

This module sits beside ``config`` at the bottom of the package: it imports no other
part of vggkit but the errors, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vggkit.errors import CheckpointError, UsageError

CHECKPOINTS = "checkpoints"
SUFFIX = ".safetensors"
# What a run writes; --overwrite removes exactly these, nothing else the folder holds.
MLFLOW_RECORD = "mlflow.json"  # --mlflow: the tracking store and run id a resume continues
# One line per start of the run (the command, when, the load): a chained run's summary names
# the command that made it, not only the last --resume.
COMMANDS = "commands.jsonl"
OWNED_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "predictions.npz",
               "report.html", "report.md", MLFLOW_RECORD, COMMANDS)
OWNED_CHECKPOINTS = ("last", "best")
# Options that say where a run goes, not how it trains: recorded in a run's config.yaml, they
# never act when that file is reused as a template (`--config RUN/config.yaml`).
BOOKKEEPING = ("out", "overwrite", "resume")
RUN_CONFIG_HEADER = ("# Written by `vggkit train` for the run in this folder. Reused with "
                     "--config, its out, overwrite\n# and resume are a record only: they "
                     "do not act (pass --out or --resume on the command line).\n")


def default_run_name(dataset: str, model: str) -> str:
    """runs/<dataset>-<model>-<timestamp>; a path dataset contributes its kind and stem."""
    kind, sep, rest = dataset.partition(":")
    name = Path(rest).stem if sep else dataset
    prefix = f"{kind}-" if sep else ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    return f"runs/{prefix}{name}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One whole line per write, flushed and fsynced: a killed process leaves no torn line
    that a reader has to guess about (readers also skip a partial last line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping a torn line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, None when it is absent, CheckpointError when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc


def written_by_a_run(config_file: str | Path) -> bool:
    """Whether ``config_file`` is a run's own config.yaml: it carries the header a run writes,
    or (runs from before the header) it sits beside the run's metrics or checkpoints."""
    path = Path(config_file)
    try:
        if path.read_text().startswith(RUN_CONFIG_HEADER[:40]):
            return True
    except (OSError, UnicodeDecodeError):
        return False
    folder = path.parent
    return path.name == "config.yaml" and (
        (folder / "metrics.jsonl").is_file()
        or any((folder / CHECKPOINTS / f"{n}{SUFFIX}").is_file() for n in OWNED_CHECKPOINTS))


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a run path or checkpoint file belongs to, or None for a lone file."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent.name == CHECKPOINTS and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


class RunFolder:
    """Paths and readers/writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # --- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.npz"

    @property
    def commands_path(self) -> Path:
        return self.path / COMMANDS

    def checkpoint(self, name: str) -> Path:
        """checkpoints/<name>.safetensors (``last`` or ``best``)."""
        return self.path / CHECKPOINTS / f"{name}{SUFFIX}"

    # --- creating
    def create(self, *, resuming: bool, overwrite: bool) -> RunFolder:
        """Make the folder; never write into a non-empty one unless resuming or told to.
        ``overwrite`` starts the run afresh: the files a run owns (metrics, checkpoints,
        summary, predictions, report) are removed, anything else the folder holds is kept."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (resuming or overwrite):
            raise UsageError(
                f"--out {out}: folder exists and is not empty; pass --resume {out} to continue "
                "it or --overwrite to train into it anyway")
        try:
            (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            if overwrite and not resuming:
                self._remove_owned()
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
        return self

    def _remove_owned(self) -> None:
        """Only vggkit's own files: a user's ``checkpoints/epoch10.safetensors`` stays."""
        for name in OWNED_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in OWNED_CHECKPOINTS:
            self.checkpoint(name).unlink(missing_ok=True)

    # --- config
    def write_config(self, text: str) -> None:
        self.config_path.write_text(RUN_CONFIG_HEADER + text)

    def read_config(self) -> dict[str, Any]:
        """config.yaml as a mapping; UsageError naming the file when it is not one."""
        path = self.config_path
        if not path.is_file():
            raise UsageError(f"{self.path}: not a run folder (no config.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UsageError(f"{path}: not readable YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: not a mapping of option: value")
        return data

    # --- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def keep_metrics_through(self, epoch: int) -> list[dict[str, Any]]:
        """Drop the lines after ``epoch``: a crash between an epoch's metrics line and its
        checkpoint leaves lines the checkpoint does not cover, and that epoch runs again."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)
        return kept

    # --- the commands that started it
    def record_start(self, command: str, *, resuming: bool) -> None:
        append_jsonl(self.commands_path, {
            "command": command, "resume": resuming,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_start": [round(v, 2) for v in os.getloadavg()]})

    def read_starts(self) -> list[dict[str, Any]]:
        return read_metrics(self.commands_path)

    # --- summary and predictions
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path)

    def write_predictions(self, logits: np.ndarray, labels: np.ndarray) -> None:
        np.savez_compressed(self.predictions_path, logits=logits, labels=labels)

    def read_predictions(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(logits, labels) of the test split, or None if absent."""
        path = self.predictions_path
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return (np.asarray(data["logits"], dtype=np.float32),
                        np.asarray(data["labels"], dtype=np.int64))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path} is not a readable predictions file: {exc}") from exc
