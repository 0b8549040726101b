"""What ``vggkit.train()`` returns in a notebook or script: the summary (a dict, as before:
``result["test_acc"]``), with the per-epoch history beside it, as Keras's ``History``, and the
run's report inline.

    result = vggkit.train(vggkit.TrainConfig(dataset="digits", epochs=5))
    result.history["val_acc"]      # one value per epoch (Keras: history.history["val_accuracy"])
    result.history.plot()          # loss and accuracy curves, a matplotlib Figure
    result.report()                # the HTML report, shown inline by Jupyter
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from vggkit.runfolder import RunFolder


class History(dict):
    """metric name -> one value per epoch (``epoch`` holds the epoch numbers, 1-based)."""

    @classmethod
    def from_metrics(cls, rows: list[dict[str, Any]]) -> History:
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        return cls({k: [row.get(k) for row in rows] for k in keys})

    @property
    def epoch(self) -> list[int]:
        return list(self.get("epoch", []))

    def plot(self, metrics: tuple[str, ...] = ("loss", "acc")):
        """One panel per metric, the training curve with the validation (or monitoring test)
        curve beside it. Returns the matplotlib Figure (Jupyter shows it)."""
        import matplotlib

        if matplotlib.get_backend().lower().startswith("tk"):
            matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5 * len(metrics), 3.5), layout="constrained")
        for i, metric in enumerate(metrics, start=1):
            ax = fig.add_subplot(1, len(metrics), i)
            for split in ("train", "val", "test"):
                values = self.get(f"{split}_{metric}")
                if values and any(v is not None for v in values):
                    ax.plot(self.epoch, values, marker="o", ms=3, label=split)
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric)
            ax.legend()
        return fig


class ReportView:
    """The run's HTML report for inline display: Jupyter calls ``_repr_html_``. The page sits
    in an iframe so that its styles do not leak into the notebook."""

    def __init__(self, page: str, height: int = 900) -> None:
        self.page, self.height = page, height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" style="width:100%;'
                f'height:{self.height}px;border:0"></iframe>')


class TrainResult(dict):
    """The summary (summary.json's fields) with ``history``, ``run`` and ``report()``."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(summary)
        self.run = Path(summary["run"]) if summary.get("run") else None
        rows = RunFolder(self.run).read_metrics() if self.run else []
        self.history = History.from_metrics(rows)

    def report(self, height: int = 900):
        """The run's report.html for inline display (written now if the run had --no-report):
        an ``IPython.display.HTML`` where IPython is installed, else an object with
        ``_repr_html_``."""
        if self.run is None:
            raise ValueError("this result has no run folder")
        page = self.run / "report.html"
        if not page.exists():
            from vggkit.evaluation.report import write_report

            write_report([self.run], self.run)
        view = ReportView(page.read_text(encoding="utf-8"), height)
        try:
            from IPython.display import HTML
        except ImportError:
            return view
        return HTML(view._repr_html_())
