"""``vggkit evaluate``: metrics of a run or checkpoint on a split, the confusion matrix as
CSV and PNG, and the terminal table."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

from vggkit.errors import UsageError
from vggkit.evaluation.metrics import classification_metrics
from vggkit.evaluation.plots import confusion_matrix_png
from vggkit.evaluation.runs import is_torch_weights, load_model, load_split
from vggkit.models.pretrained import imagenet_model_name
from vggkit.runfolder import RunFolder, run_folder_of

log = logging.getLogger("vggkit.evaluate")


def _slug(dataset: str) -> str:
    kind, _, rest = dataset.partition(":")
    name = Path(rest.rstrip("/\\")).name if rest else kind
    prefix = f"{kind}-" if rest else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix + name).strip("-.") or "dataset"


def output_stem(split: str, dataset: str | None, own_dataset: str) -> str:
    """``confusion_matrix`` for the run's own test split; other splits and datasets get a
    suffix (``confusion_matrix_val``, ``confusion_matrix_mnist``), so evaluating them never
    replaces the test split's files."""
    parts = ["confusion_matrix"]
    if dataset is not None and dataset != own_dataset:
        parts.append(_slug(dataset))
    if split != "test":
        parts.append(split)
    return "_".join(parts)


def write_confusion_csv(path: Path, cm: list[list[int]], classes: list[str]) -> None:
    """Rows are true classes, columns predicted classes; the first row and column name them."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, cm):
            writer.writerow([name, *row])


def evaluate(
    run_or_checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    tta: bool = False,
    tta_translate: int | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 512,
    classes_file: str | Path | None = None,
) -> dict[str, Any]:
    """Top-1, top-5, loss, per-class precision/recall/F1/support, macro averages and the
    confusion matrix of a run's final weights (or a checkpoint file) on a split of its
    dataset, prepared exactly as in training.

    Writes ``confusion_matrix.csv`` and ``.png`` into ``out_dir`` (default: the run folder;
    for a lone checkpoint file, its folder, as ``<file stem>.confusion_matrix.csv``, and a
    replaced earlier evaluation is logged); splits other than test and other datasets get a
    suffix (see ``output_stem``). Returns a JSON-able dict.

    ``tta`` averages with the mirror image, and with ``tta_translate`` t also the views
    shifted by t pixels, as training's final test does (default: the run's own
    ``tta_translate`` when it was trained with --tta, else 0). ``run_or_checkpoint`` may be
    torchvision-layout VGG weights (.pth/.pt): then ``dataset`` is needed, and
    ``classes_file`` names the weights' classes.
    """
    from vggkit.data import Loader
    from vggkit.data.crops import eval_crop
    from vggkit.training.engine import make_engine
    from vggkit.training.scoring import collect_logits

    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    path = Path(run_or_checkpoint)
    imagenet = imagenet_model_name(run_or_checkpoint) is not None
    if dataset is None and (imagenet or is_torch_weights(path)):  # before loading 500 MB of weights
        raise UsageError(f"--dataset: {path} is torchvision weights, which name no dataset; give "
                         "--dataset (its classes must be the weights', see --classes FILE)")
    model, ckpt = load_model(path, classes_file)
    run = run_folder_of(path)
    meta = ckpt.meta
    translate = resolve_translate(tta, tta_translate, meta["config"])
    side = int(meta["image_shape"][-1])
    if translate >= side:  # checked as train checks it, before any data is read
        raise UsageError(f"--tta-translate {translate}: must be smaller than the image side {side} "
                         "(the shifted views reflect-pad the image by that many pixels)")
    precision = precision or run_precision(meta, run)
    data = load_split(meta, split, dataset=dataset, data_dir=data_dir)
    engine = make_engine(device, precision, meta["config"].get("channels_last", True), False)
    model = engine.prepare(model)
    loader = Loader(data.images, data.labels, batch_size, shuffle=False, mean=meta["mean"],
                    std=meta["std"], device=engine.device, channels_last=engine.channels_last,
                    photo=eval_crop(meta))
    logits, labels = collect_logits(model, loader, engine, tta=tta, translate=translate)
    result: dict[str, Any] = {
        "run": str(run) if run else None,
        "checkpoint": str(ckpt.path),
        "dataset": data.dataset,
        "split": split,
        "tta": tta,
        "tta_translate": translate,
        "device": str(engine.device),
        "precision": engine.precision,
    }
    result.update(classification_metrics(logits.numpy(), labels.numpy(), meta["classes"]))

    # imagenet:MODEL's file is in a weights cache: its results go to the current folder.
    out = Path(out_dir) if out_dir is not None else (run or (Path() if imagenet else ckpt.path.parent))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        stem = output_stem(split, dataset, meta["config"]["dataset"])
        if run is None and not imagenet:  # a lone file: named after it, beside others
            stem = f"{ckpt.path.stem}.{stem}"
        csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
        if run is None and (csv_path.exists() or png_path.exists()):
            log.warning("evaluate: replacing %s and .png (an earlier evaluation of %s)",
                        csv_path, ckpt.path.name)
        write_confusion_csv(csv_path, result["confusion_matrix"], result["classes"])
        title = (f"{data.dataset} {split} split, n={result['n']}, top-1 "
                 f"{100 * result['top1']:.2f}%{' (TTA)' if tta else ''}")
        png_path.write_bytes(confusion_matrix_png(result["confusion_matrix"], result["classes"],
                                                  title, result["most_confused"]))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    result["paths"] = {"csv": str(csv_path), "png": str(png_path)}
    return result


def run_precision(meta: dict[str, Any], run: Path | None) -> str:
    """The precision the run was tested in (so that evaluate reproduces summary.json): the
    checkpoint's, else its summary's, else its config's; fp16 off a GPU becomes auto."""
    import torch

    summary = (RunFolder(run).read_summary() or {}) if run is not None else {}
    own = meta.get("precision") or summary.get("precision") or meta["config"].get("precision", "auto")
    if own == "fp16" and not torch.cuda.is_available():
        log.info("evaluate: the run was trained in fp16 on a GPU; no GPU here: --precision auto")
        return "auto"
    return own


def resolve_translate(tta: bool, tta_translate: int | None, config: dict[str, Any]) -> int:
    """Pixels of the TTA's shifted views: the flag's, else the run's own when it was trained
    with --tta (so that evaluate reproduces its summary's test accuracy), else 0."""
    if tta_translate is None:
        return int(config.get("tta_translate") or 0) if tta and config.get("tta") else 0
    if isinstance(tta_translate, bool) or not isinstance(tta_translate, int) or tta_translate < 0:
        raise UsageError(f"--tta-translate must be a non-negative integer, got {tta_translate!r}")
    if tta_translate and not tta:
        raise UsageError("--tta-translate: only with --tta (it shifts the TTA's views)")
    return tta_translate


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _tta_note(result: dict[str, Any]) -> str:
    if not result.get("tta"):
        return ""
    shift = result.get("tta_translate") or 0
    return f" (TTA: flipped{f' and {shift}-pixel shifted' if shift else ''} views averaged)"


def format_evaluation(result: dict[str, Any]) -> str:
    """The terminal table: headline metrics, per-class table, macro averages, and the
    confusion matrix (up to 20 classes) or the most-confused pairs."""
    classes = result["classes"]
    lines = [
        f"{result['dataset']} {result['split']} split: {result['n']:,} images, "
        f"{result['checkpoint']}{_tta_note(result)}",
        f"top-1 accuracy  {_pct(result['top1'])}",
    ]
    if result.get("top5") is not None:
        lines.append(f"top-5 accuracy  {_pct(result['top5'])}")
    lines += [f"loss            {result['loss']:.4f}", ""]
    width = max(9, *(len(c) for c in classes))
    header = f"{'class':<{width}}  {'precision':>9}  {'recall':>7}  {'f1':>7}  {'support':>8}"
    lines += [header, "-" * len(header)]
    for row in result["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:>9.4f}  {row['recall']:>7.4f}  "
                     f"{row['f1']:>7.4f}  {row['support']:>8,}")
    macro = result["macro"]
    lines += ["-" * len(header),
              f"{'macro avg':<{width}}  {macro['precision']:>9.4f}  {macro['recall']:>7.4f}  "
              f"{macro['f1']:>7.4f}  {result['n']:>8,}", ""]
    cm = result["confusion_matrix"]
    if len(classes) <= 20:
        names = [c[:6] for c in classes]
        cell = max(5, *(len(n) for n in names), *(len(str(v)) for r in cm for v in r))
        rowname = min(width, 12)
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        lines.append(" " * rowname + " " + "".join(f"{n:>{cell + 1}}" for n in names))
        for name, row in zip(classes, cm):
            lines.append(f"{name[:rowname]:<{rowname}} " + "".join(f"{v:>{cell + 1}}" for v in row))
        lines.append("")
    pairs = result.get("most_confused") or []
    if pairs:
        shown = pairs[:5] if len(classes) <= 20 else pairs
        lines.append(f"most-confused pairs (true -> predicted: count), top {len(shown)}")
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in shown]
        lines.append("")
    if result.get("paths"):
        lines.append("wrote " + ", ".join(result["paths"].values()))
    return "\n".join(lines)
