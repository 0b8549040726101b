"""``vggkit results``: the README's results table, generated from committed run artefacts.

``collect`` copies a finished run's small files (config, metrics, summary, report, confusion
matrix, learning curves; never checkpoints or predictions) into ``docs/results/<name>/``;
``table`` builds one Markdown table from those folders and writes it between two marker
lines of the README, or checks that the README's copy is current. The table holds no
timestamp and no absolute path, so the same folders always give the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vggkit.errors import CheckpointError, UsageError, VggkitError
from vggkit.evaluation import plots
from vggkit.evaluation.evaluator import write_confusion_csv
from vggkit.evaluation.metrics import confusion_matrix, most_confused
from vggkit.evaluation.report import duration, pct, per_epoch_rows
from vggkit.evaluation.runs import read_predictions
from vggkit.runfolder import RunFolder

log = logging.getLogger(__name__)

DEFAULT_DIR = "docs/results"
BEGIN = "<!-- results-table:begin -->"
END = "<!-- results-table:end -->"
EXPERIMENT = "experiment.yaml"
_RUN = RunFolder(".")
COPIED = tuple(p.name for p in (_RUN.config_path, _RUN.metrics_path, _RUN.summary_path))
CM_CSV, CM_PNG, CURVES_PNG, REPORT_MD = ("confusion_matrix.csv", "confusion_matrix.png",
                                         "curves.png", "report.md")
LOADED = 2.5  # 1-minute load above which a run's times are marked inflated (2-core host)
NONE = "—"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")  # ![alt](target) in report.md


# ----------------------------------------------------------------------------- collect
def collect(run: str | Path, name: str, *, experiment: str | None = None,
            into: str | Path = DEFAULT_DIR, overwrite: bool = False) -> Path:
    """Copy a finished run's small artefacts into ``into/name/`` (drawing the confusion
    matrix and learning curves if the run has none) and write ``experiment.yaml``.
    Refuses to change an existing ``into/name/`` unless ``overwrite``. Returns the folder."""
    run = Path(run)
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(it becomes a folder name and a link)")
    if not run.is_dir():
        raise UsageError(f"{run}: not a folder (expected a finished run folder)")
    if not RunFolder(run).summary_path.is_file():
        raise UsageError(f"{run}: not a finished run folder (no summary.json)")
    dest = Path(into) / name
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a folder")
    if dest.resolve() == run.resolve():
        raise UsageError(f"{run}: already the collected folder {dest}")
    with tempfile.TemporaryDirectory(prefix="vggkit-results-") as tmp:
        staged = Path(tmp)
        stage_artefacts(run, staged)
        if not overwrite:
            _refuse_changes(staged, dest)
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(staged.rglob("*")):
            if path.is_file():
                target = dest / path.relative_to(staged)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    write_experiment(dest / EXPERIMENT, experiment, default=name)
    return dest


def stage_artefacts(run: Path, out: Path) -> None:
    summary = _read_summary(RunFolder(run).summary_path)
    for file in COPIED:
        if not (run / file).is_file():
            raise UsageError(f"{run}: not a finished run folder (no {file})")
        shutil.copyfile(run / file, out / file)
    _relative_paths(out / RunFolder(out).summary_path.name)
    for file in (CM_CSV, CM_PNG):  # `vggkit evaluate RUN` writes them
        if (run / file).is_file():
            shutil.copyfile(run / file, out / file)
    stage_report(run, out)
    if not (out / CM_CSV).is_file() or not (out / CM_PNG).is_file():
        draw_confusion(run, summary, out)
    if not (out / CURVES_PNG).is_file():
        (out / CURVES_PNG).write_bytes(draw_curves(run, summary))


def _relative_paths(summary_path: Path) -> None:
    """The collected summary names the data and the run relative to the working directory
    (the repository), never by a path of the machine the run was made on."""
    summary = json.loads(summary_path.read_text())
    dataset = summary.get("dataset") or {}
    for holder, key in ((dataset, "source"), (summary, "run")):
        value = holder.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            holder[key] = os.path.relpath(value)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def stage_report(run: Path, out: Path) -> None:
    """report.md with the images it links to. The report's curves and confusion matrix
    become ``curves.png`` and ``confusion_matrix.png`` (links rewritten) where the run has
    none of its own, rather than being drawn again."""
    source = run
    with tempfile.TemporaryDirectory(prefix="vggkit-report-") as tmp:
        if not _report_complete(run):  # --no-report, or its images deleted: write it anew
            from vggkit.evaluation.report import write_report

            source = Path(tmp)
            write_report([run], source)
        text = (source / REPORT_MD).read_text()
        for link in sorted({m.group(1) for m in IMAGE_LINK.finditer(text)}):
            target = out / link
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / link, target)
    for name in (CURVES_PNG, CM_PNG):
        image = out / "report_files" / name
        if image.is_file() and not (out / name).exists():
            image.replace(out / name)
            text = text.replace(f"](report_files/{name})", f"]({name})")
    _remove_if_empty(out / "report_files")
    (out / REPORT_MD).write_text(text)


def draw_confusion(run: Path, summary: dict[str, Any], out: Path) -> None:
    """The confusion matrix CSV and PNG from predictions.npz, as ``vggkit evaluate`` draws
    them (a file already staged is kept)."""
    predictions = read_predictions(run)
    if predictions is None:
        raise UsageError(f"{run}: no {CM_CSV}/{CM_PNG} and no predictions.npz to draw them from")
    logits, labels = predictions
    classes = _class_names(run, logits.shape[1])
    cm = confusion_matrix(labels, logits.argmax(1), len(classes))
    if not (out / CM_CSV).is_file():
        write_confusion_csv(out / CM_CSV, cm.tolist(), classes)
    if not (out / CM_PNG).is_file():
        top1 = float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0
        title = (f"{(summary.get('dataset') or {}).get('name', '?')} test split, "
                 f"n={len(labels)}, top-1 {100 * top1:.2f}%"
                 f"{' (TTA)' if summary.get('tta') else ''}")
        (out / CM_PNG).write_bytes(plots.confusion_matrix_png(cm, classes, title,
                                                              most_confused(cm, classes, 20)))


def _class_names(run: Path, count: int) -> list[str]:
    from vggkit.training.checkpoint import find_checkpoint, load_checkpoint

    try:
        return list(load_checkpoint(find_checkpoint(run, "last")).classes)
    except VggkitError as exc:
        log.warning("%s: class names unknown, numbering them (%s)", run, exc)
        return [str(i) for i in range(count)]


def _report_complete(run: Path) -> bool:
    if not (run / REPORT_MD).is_file():
        return False
    links = [m.group(1) for m in IMAGE_LINK.finditer((run / REPORT_MD).read_text())]
    return all(_relative(link) and (run / link).is_file() for link in links)


def _relative(link: str) -> bool:
    """A link to a file inside the run folder (a report's own image links are)."""
    return not os.path.isabs(link) and ".." not in Path(link).parts


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def draw_curves(run: Path, summary: dict[str, Any]) -> bytes:
    """Loss and accuracy per epoch from metrics.jsonl; an epoch evaluated on the test split
    (no validation split) has test_* keys instead of val_*."""
    rows = per_epoch_rows([r for r in RunFolder(run).read_metrics()
                           if isinstance(r, dict) and "epoch" in r])
    has_val = (summary.get("val_size") or (summary.get("dataset") or {}).get("val") or 0) > 0
    return plots.curves_png([{"label": run.name, "rows": rows,
                              "val_label": "validation" if has_val else "test"}])


def _refuse_changes(staged: Path, dest: Path) -> None:
    """An existing collected folder may only be collected again from the same run."""
    if not dest.exists():
        return
    for path in sorted(staged.rglob("*")):
        target = dest / path.relative_to(staged)
        if path.is_file() and (not target.is_file() or target.read_bytes() != path.read_bytes()):
            raise UsageError(f"{dest}: already holds a different run ({target.relative_to(dest)} "
                             "differs or is missing); "
                             "use --overwrite to replace it, or another --name")


def write_experiment(path: Path, experiment: str | None, default: str) -> None:
    """``experiment: TEXT`` first, then any other key already there (order, note, ...)."""
    old = read_experiment(path)
    text = experiment if experiment is not None else old.get("experiment", default)
    data = {"experiment": text, **{k: v for k, v in old.items() if k != "experiment"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_experiment(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not readable YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping like 'experiment: TEXT'")
    if "order" in data and (isinstance(data["order"], bool)
                            or not isinstance(data["order"], (int, float))):
        raise UsageError(f"{path}: order must be a number, got {data['order']!r}")
    return data


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return summary


# ----------------------------------------------------------------------------- table
HEADERS = ["experiment", "model (parameters)", "dataset (train / val / test)", "epochs",
           "test accuracy", "best validation accuracy (source)", "time of learning", "images/s",
           "machine", "load (1 min, start → end)", "command", "files"]


def collected_runs(folder: str | Path) -> list[Path]:
    """Every ``folder/*/`` with a summary.json, by experiment.yaml's order, then name."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    runs = [p for p in folder.iterdir() if RunFolder(p).summary_path.is_file()] \
        if folder.is_dir() else []
    order = {run: read_experiment(run / EXPERIMENT).get("order") for run in runs}
    return sorted(runs, key=lambda r: (order[r] is None, order[r] or 0, r.name))


def build_table(folder: str | Path, link_base: str | Path = ".") -> str:
    """The Markdown table of every collected run; links are relative to ``link_base`` (the
    README's folder)."""
    runs = collected_runs(folder)
    if not runs:
        return "_No runs collected yet (`vggkit results collect RUN --name NAME` adds one)._"
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    for run in runs:
        cells = table_row(run, link_base)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    repeats = repeats_table(runs)
    return "\n".join(lines) + (f"\n\n{repeats}" if repeats else "")


def table_row(run: Path, link_base: str | Path) -> list[str]:
    s = _read_summary(RunFolder(run).summary_path)
    experiment = read_experiment(run / EXPERIMENT).get("experiment") or run.name
    return [str(experiment), _model(s), _dataset(s), _epochs(s, _configured_epochs(run)),
            _test_accuracy(s), _best(s), _or_none(s.get("train_seconds"), duration),
            _or_none(s.get("images_per_second"), lambda v: f"{v:,.0f}"), _machine(s),
            _load(s), _command(s), _links(run, link_base)]


# Config keys that say where a run went or how it talked, not what it learned: runs that
# differ only in these (and the seed) repeat one experiment.
BOOKKEEPING = ("seed", "out", "overwrite", "resume", "log_every", "tensorboard", "report")
REPEAT_HEADERS = ["runs (seed)", "test accuracy, mean ± s.d.", "lowest – highest",
                  "time of learning, mean"]


def repeats_table(runs: list[Path]) -> str:
    """One row per configuration run more than once (other seeds): the spread of its test
    accuracy. Empty when nothing was repeated."""
    configs = {run: _config(run) for run in runs}
    groups: dict[str, list[Path]] = {}
    for run, config in configs.items():
        if config is not None:
            key = yaml.safe_dump({k: v for k, v in config.items() if k not in BOOKKEEPING})
            groups.setdefault(key, []).append(run)
    rows = [_repeat_row(group, configs) for group in groups.values() if len(group) > 1]
    rows = [row for row in rows if row]
    if not rows:
        return ""
    lines = ["Repeated runs (one configuration, several seeds; s.d. is the sample standard "
             "deviation, in points):", "",
             "| " + " | ".join(REPEAT_HEADERS) + " |", "|" + " --- |" * len(REPEAT_HEADERS)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _repeat_row(group: list[Path], configs: dict[Path, dict[str, Any]]) -> list[str] | None:
    summaries = [_read_summary(RunFolder(run).summary_path) for run in group]
    accs = [s["test_acc"] for s in summaries if s.get("test_acc") is not None]
    if len(accs) < 2:
        return None
    names = ", ".join(f"{run.name} ({configs[run].get('seed', NONE)})" for run in group)
    spread = f"{pct(statistics.mean(accs))} ± {100 * statistics.stdev(accs):.2f}"
    times = [s["train_seconds"] for s in summaries if s.get("train_seconds") is not None]
    return [f"{names}: {len(accs)} runs", spread, f"{pct(min(accs))} – {pct(max(accs))}",
            duration(statistics.mean(times)) if times else NONE]


def _or_none(value: Any, fmt) -> str:
    return NONE if value is None else fmt(value)


def _model(s: dict[str, Any]) -> str:
    name = (s.get("model") or {}).get("name", NONE)
    total = (s.get("params") or {}).get("total")
    return f"{name} ({total:,})" if total is not None else name


def _dataset(s: dict[str, Any]) -> str:
    d = s.get("dataset") or {}
    val = s.get("val_size", d.get("val"))
    sizes = " / ".join(NONE if v is None else f"{v:,}"
                       for v in (d.get("train"), val, d.get("test")))
    return f"{d.get('name', NONE)} ({sizes})"


def _config(run: Path) -> dict[str, Any] | None:
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None  # the table then leaves out what only the config says
    return config if isinstance(config, dict) else None


def _configured_epochs(run: Path) -> int | None:
    epochs = (_config(run) or {}).get("epochs")
    return epochs if isinstance(epochs, int) else None


def _epochs(s: dict[str, Any], configured: int | None) -> str:
    done = s.get("epochs_completed")
    if done is None:
        return NONE
    if configured is not None and done < configured:
        return f"{done} of {configured}" + (" (stopped early)" if s.get("stopped_early") else "")
    return str(done)


def _test_accuracy(s: dict[str, Any]) -> str:
    if s.get("test_acc") is None:
        return NONE
    return pct(s["test_acc"]) + (" (TTA)" if s.get("tta") else "")


def _best(s: dict[str, Any]) -> str:
    source = {"val": "validation split", "test": "test split"}.get(s.get("val_source"),
                                                                    s.get("val_source"))
    best = NONE if s.get("best_val_acc") is None else pct(s["best_val_acc"])
    if s.get("best_epoch") is not None and s.get("best_val_acc") is not None:
        best += f" (epoch {s['best_epoch']})"
    return f"{best}; {source}" if source else best


def _machine(s: dict[str, Any]) -> str:
    m = s.get("machine") or {}
    parts = [m.get("cpu"), f"{m['cpu_count']} cores" if m.get("cpu_count") else None,
             m.get("gpu"), s.get("precision")]
    return ", ".join(str(p) for p in parts if p) or NONE


def _load(s: dict[str, Any]) -> str:
    load = s.get("load_average") or {}
    first = [(load.get(k) or [None])[0] for k in ("start", "end")]
    if all(v is None for v in first):
        return NONE
    text = " → ".join(NONE if v is None else f"{v:.1f}" for v in first)
    return text + (" ⚠ loaded" if any(v is not None and v > LOADED for v in first) else "")


def _command(s: dict[str, Any]) -> str:
    """The command that made the run, and how many --resume pieces followed it."""
    if s.get("command") is None:
        return NONE
    starts = s.get("starts") or []
    resumes = sum(1 for r in starts if r.get("resume"))
    made = len(starts) > resumes  # else an older vggkit made it: the command is a resume
    pieces = f", then {resumes} `--resume` piece{'s' * (resumes > 1)}" if made and resumes else ""
    return _code(s["command"]) + pieces


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _links(run: Path, link_base: str | Path) -> str:
    links = [f"[{label}]({Path(os.path.relpath(run / file, link_base)).as_posix()})"
             for label, file in (("confusion matrix", CM_PNG), ("report", REPORT_MD))
             if (run / file).is_file()]
    return ", ".join(links) or NONE


def _cell(text: str) -> str:
    # GitHub applies \| inside code spans too, so one rule for every cell.
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- README
def replace_block(text: str, table: str, readme: str | Path) -> str:
    """``text`` with the lines between the begin and end markers replaced by ``table``."""
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise UsageError(f"{readme}: needs one line {BEGIN} and, below it, one line {END} "
                         "where the results table goes")
    return "\n".join(lines[:begins[0] + 1] + ["", table, ""] + lines[ends[0]:])


def update_readme(folder: str | Path, readme: str | Path, check: bool = False) -> bool:
    """Write the table into ``readme`` (or, with ``check``, only compare). Returns whether
    the README's block was already current."""
    readme = Path(readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--readme {readme}: cannot read it ({exc.strerror or exc})") from None
    new = replace_block(text, build_table(folder, readme.parent), readme)
    if new == text or check:
        return new == text
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)
    return False
