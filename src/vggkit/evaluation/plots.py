"""Figures as PNG bytes: confusion matrix, learning curves, misclassified images.

Figures are drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure``, never
pyplot, so nothing here changes the user's backend or global figure state and it works
without a display. Pixel sizes are fixed (inches x ``DPI``, no tight bounding box), so a
figure's size is known before it is drawn.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

DPI = 100
MAX_ANNOTATED_CLASSES = 30  # above this the heatmap has no numbers (the cells are too small)
MAX_TICK_LABELS = 50
CONFUSED_PAIRS_LISTED = 20


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "vggkit"})
    return buf.getvalue()


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ----------------------------------------------------------------------------- confusion matrix
def confusion_matrix_inches(num_classes: int) -> tuple[float, float]:
    """(width, height) in inches: about 0.5 in per class with numbers, 0.12 without, plus
    room for labels and the colour bar; and a side panel listing the most-confused pairs when
    there are no numbers."""
    annotated = num_classes <= MAX_ANNOTATED_CLASSES
    side = max(4.5, (0.5 if annotated else 0.12) * num_classes) + 2.5
    width = side + 1.5 + (0.0 if annotated else 4.5)
    return round(width, 2), round(side, 2)


def confusion_matrix_pixels(num_classes: int) -> tuple[int, int]:
    w, h = confusion_matrix_inches(num_classes)
    return round(w * DPI), round(h * DPI)


def confusion_matrix_png(cm: np.ndarray, classes: list[str], title: str = "",
                         most_confused: list[dict[str, Any]] | None = None) -> bytes:
    """A labelled heatmap (rows: true class, columns: predicted), coloured by the fraction
    of each true class and annotated with counts when there are at most 30 classes; with more,
    no numbers and the most-confused pairs listed beside it."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    annotated = k <= MAX_ANNOTATED_CLASSES
    fig = _figure(*confusion_matrix_inches(k))
    if annotated:
        ax = fig.add_subplot(1, 1, 1)
    else:
        grid = fig.add_gridspec(1, 2, width_ratios=[confusion_matrix_inches(k)[1] + 1.5, 4.5])
        ax = fig.add_subplot(grid[0, 0])
        side = fig.add_subplot(grid[0, 1])
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, aspect=20 if annotated else 50,
                 label="fraction of the true class")
    step = max(1, math.ceil(k / MAX_TICK_LABELS))
    ticks = np.arange(0, k, step)
    ax.set_xticks(ticks, [_short(classes[i]) for i in ticks], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=9 if k <= 20 else 7)
    ax.set_yticks(ticks, [_short(classes[i]) for i in ticks], fontsize=9 if k <= 20 else 7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=11)
    if annotated:
        size = 10 if k <= 12 else 8 if k <= 20 else 6
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=size,
                        color="white" if frac[t, p] > 0.5 else "black")
    else:
        side.axis("off")
        pairs = most_confused or []
        lines = [f"{CONFUSED_PAIRS_LISTED} most-confused pairs", "(true → predicted: count)", ""]
        lines += [f"{i + 1:>2}. {_short(p['true'], 16)} → {_short(p['predicted'], 16)}: "
                  f"{p['count']}" for i, p in enumerate(pairs[:CONFUSED_PAIRS_LISTED])]
        if not pairs:
            lines.append("none: every image is on the diagonal")
        side.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace",
                  fontsize=9, transform=side.transAxes)
    return _png(fig)


# ----------------------------------------------------------------------------- curves
CURVES_INCHES = (12.0, 4.5)


def curves_png(series: list[dict[str, Any]], title: str = "") -> bytes:
    """Loss and accuracy per epoch, train (dashed) and validation/test (solid).

    ``series``: one dict per run with ``label``, ``rows`` (metrics.jsonl records) and
    ``val_label`` ("test" or "validation"). One run: train and val in two colours; several
    runs: one colour per run, overlaid."""
    fig = _figure(*CURVES_INCHES)
    ax_loss, ax_acc = fig.subplots(1, 2)
    several = len(series) > 1
    for i, run in enumerate(series):
        rows = run["rows"]
        epochs = [r["epoch"] for r in rows]
        marker = "o" if len(epochs) <= 30 else None
        val_name = run.get("val_label", "test")
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
            train = [r.get(f"train_{key}", float("nan")) * scale for r in rows]
            val = [r.get(f"val_{key}", float("nan")) * scale for r in rows]
            if several:
                colour = f"C{i % 10}"
                ax.plot(epochs, val, color=colour, marker=marker, markersize=3,
                        label=f"{run['label']} ({val_name})")
                ax.plot(epochs, train, color=colour, linestyle="--", alpha=0.7,
                        label=f"{run['label']} (train)")
            else:
                ax.plot(epochs, train, color="C0", marker=marker, markersize=3, label="train")
                ax.plot(epochs, val, color="C1", marker=marker, markersize=3, label=val_name)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if any(run["rows"] for run in series):
            ax.legend(fontsize=8 if several else 9)
        # whole epochs on the axis
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _png(fig)


def curves_pixels() -> tuple[int, int]:
    return round(CURVES_INCHES[0] * DPI), round(CURVES_INCHES[1] * DPI)


# ----------------------------------------------------------------------------- misclassified
GRID_COLUMNS = 8
CELL_INCHES = (1.5, 1.9)


def grid_inches(count: int) -> tuple[float, float]:
    rows = max(1, math.ceil(count / GRID_COLUMNS))
    return GRID_COLUMNS * CELL_INCHES[0], rows * CELL_INCHES[1]


def grid_pixels(count: int) -> tuple[int, int]:
    w, h = grid_inches(count)
    return round(w * DPI), round(h * DPI)


def _cell_pixels(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (C, H, W) -> (side, side, 3) by nearest-neighbour sampling (crisp small images)."""
    c, h, w = image.shape
    rows = np.arange(side) * h // side
    cols = np.arange(side) * w // side
    rgb = np.repeat(image[:1], 3, axis=0) if c == 1 else image[:3]
    return np.transpose(rgb[:, rows][:, :, cols], (1, 2, 0))


def misclassified_png(images: np.ndarray, true_names: list[str], predicted_names: list[str],
                      probabilities: list[float]) -> bytes:
    """A grid of uint8 (N, C, H, W) images, 8 a row, each titled with its true and predicted
    class (and the predicted probability). Drawn as one mosaic with text above each cell: a
    figure of 32 small axes would take seconds to lay out."""
    images = np.asarray(images)
    width_in, height_in = grid_inches(len(images))
    fig = _figure(width_in, height_in)
    fig.set_layout_engine("none")
    cell_w, cell_h = round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI)
    side = cell_w - 16  # image side in pixels, a margin either side
    rows = max(1, math.ceil(len(images) / GRID_COLUMNS))
    mosaic = np.full((rows * cell_h, GRID_COLUMNS * cell_w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, GRID_COLUMNS)
        top, left = r * cell_h + (cell_h - side) - 6, c * cell_w + 8
        mosaic[top:top + side, left:left + side] = _cell_pixels(image, side)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for i, (true, pred, prob) in enumerate(zip(true_names, predicted_names, probabilities)):
        r, c = divmod(i, GRID_COLUMNS)
        x = (c + 0.5) / GRID_COLUMNS
        y = 1 - (r * cell_h + (cell_h - side - 6) / 2) / (rows * cell_h)
        fig.text(x, y, f"true: {_short(true)}\npred: {_short(pred)} ({prob:.0%})", ha="center",
                 va="center", fontsize=8, color="#a40000")
    return _png(fig)


# ----------------------------------------------------------------------------- Grad-CAM grid
CAM_SIDE = 128  # pixels a side of each overlay
CAM_COLUMNS = 4
CAM_CELL_INCHES = (1.5, 1.7)
CAM_LABEL_INCHES = 1.4  # the column of true-class names


def cam_grid_inches(rows: int, columns: int = CAM_COLUMNS) -> tuple[float, float]:
    columns = max(1, min(columns, CAM_COLUMNS))
    return CAM_LABEL_INCHES + columns * CAM_CELL_INCHES[0], max(1, rows) * CAM_CELL_INCHES[1]


def cam_grid_pixels(rows: int, columns: int = CAM_COLUMNS) -> tuple[int, int]:
    w, h = cam_grid_inches(rows, columns)
    return round(w * DPI), round(h * DPI)


def cam_grid_png(rows: list[tuple[str, list[np.ndarray], list[str]]]) -> bytes:
    """Grad-CAM overlays a row per true class: ``rows`` of (true class name, RGB uint8
    overlays (H, W, 3), captions), at most 4 a row, each resampled to 128 px and captioned
    above. One mosaic with text, as :func:`misclassified_png`."""
    columns = max((len(r[1]) for r in rows), default=1)
    fig = _figure(*cam_grid_inches(len(rows), columns))
    fig.set_layout_engine("none")
    cell_w, cell_h = round(CAM_CELL_INCHES[0] * DPI), round(CAM_CELL_INCHES[1] * DPI)
    label_w = round(CAM_LABEL_INCHES * DPI)
    total_w, total_h = cam_grid_pixels(len(rows), columns)
    mosaic = np.full((total_h, total_w, 3), 255, dtype=np.uint8)
    top_pad = cell_h - CAM_SIDE - 6  # room for the caption above each overlay
    for r, (_name, pictures, _captions) in enumerate(rows):
        for c, rgb in enumerate(pictures[:CAM_COLUMNS]):
            top, left = r * cell_h + top_pad, label_w + c * cell_w + (cell_w - CAM_SIDE) // 2
            mosaic[top:top + CAM_SIDE, left:left + CAM_SIDE] = _cell_pixels(
                np.transpose(rgb, (2, 0, 1)), CAM_SIDE)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for r, (name, _pictures, captions) in enumerate(rows):
        y_mid = 1 - (r * cell_h + top_pad + CAM_SIDE / 2) / total_h
        fig.text(6 / total_w, y_mid, f"true:\n{_short(name, 16)}", ha="left", va="center",
                 fontsize=9, weight="bold")
        for c, caption in enumerate(captions[:CAM_COLUMNS]):
            x = (label_w + (c + 0.5) * cell_w) / total_w
            y = 1 - (r * cell_h + top_pad / 2) / total_h
            fig.text(x, y, caption, ha="center", va="center", fontsize=7, color="#a40000")
    return _png(fig)
