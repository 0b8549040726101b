"""``vggkit sweep``: one training per value (or per combination of values) of some config
keys, each into its own run folder under one sweep folder, then one comparison report.

    vggkit sweep --recipe vgg16-cifar10-classic --vary epochs=10,20,50,100

Every combination is built and validated by the config code before anything trains, so an
unknown key or a bad value fails up front. A run that fails is recorded and the sweep goes
on; the report compares the runs that finished.

Epochs sweeps are chained where that is exact: with a schedule that does not depend on the
total number of epochs (constant, step, time-decay, plateau) and no early stop, the run to
20 epochs is the run to 10 epochs continued for 10 more. The sweep then trains the 10-epoch
run, copies its folder and resumes the copy to 20 epochs (vggkit's resume is exact: same data
order, augmentation, RNG and optimizer states), so the four runs of 10/20/50/100 epochs cost
one 100-epoch training, and each folder still holds its own complete run (its summary.json
`train_seconds` counts every epoch, the inherited ones included). ``chain=False``
(``--no-chain``) trains every run from scratch; the tests check both give the same weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vggkit.config import FIELDS, TrainConfig, apply_overrides, field_type
from vggkit.errors import UsageError, VggkitError, did_you_mean
from vggkit.runfolder import RunFolder

log = logging.getLogger("vggkit.sweep")

# Schedules whose rate at iteration i does not depend on the total number of epochs.
EPOCH_INDEPENDENT_SCHEDULES = ("constant", "step", "time-decay", "plateau")
# Keys a sweep sets itself.
NOT_VARIED = ("out", "resume", "overwrite")
MANIFEST = "sweep.json"


@dataclass
class SweepRun:
    name: str
    values: dict[str, Any]
    config: TrainConfig
    chained_from: str | None = None  # the run folder name this one continues (epochs chain)
    status: str = "pending"  # pending | done | kept | failed | skipped
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        s = self.summary
        return {
            "name": self.name, "values": self.values, "run": self.config.out,
            "status": self.status, "error": self.error, "chained_from": self.chained_from,
            "test_acc": s.get("test_acc"), "best_val_acc": s.get("best_val_acc"),
            "best_epoch": s.get("best_epoch"), "epochs_completed": s.get("epochs_completed"),
            "train_seconds": s.get("train_seconds"), "wall_seconds": s.get("wall_seconds"),
        }


# ----------------------------------------------------------------------------- planning
def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["epochs=10,20", "lr=0.1,0.01"]`` -> ``[("epochs", ["10", "20"]), ("lr", [...])]``.
    Values are separated by commas; for a list-valued key (``betas``) by semicolons."""
    if not items:
        raise UsageError("--vary: give at least one KEY=V1,V2,... (e.g. --vary epochs=10,20)")
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--vary {item!r}: expected KEY=V1,V2,... like epochs=10,20")
        if key not in FIELDS:
            raise UsageError(f"--vary {item!r}: unknown key {key!r}{did_you_mean(key, FIELDS)}")
        if key in NOT_VARIED:
            raise UsageError(f"--vary {item!r}: {key} is set by the sweep itself and cannot vary")
        if key in (k for k, _ in out):
            raise UsageError(f"--vary: {key} given twice; list all its values in one --vary")
        is_list = str(field_type(key)[0]).startswith("list")
        values = [v.strip() for v in raw.split(";" if is_list else ",")]
        if not values or any(v == "" for v in values):
            raise UsageError(f"--vary {item!r}: empty value")
        if len(set(values)) != len(values):
            raise UsageError(f"--vary {item!r}: a value is repeated")
        out.append((key, values))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")[:60] or "x"


def _run_name(index: int, values: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, list):
            return "_".join(f"{x:g}" for x in v)
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, str) and ":" in v:  # folder:/a/b/cifar.zip -> folder-cifar
            kind, _, path = v.partition(":")
            return f"{kind}-{Path(path).stem}"
        return str(v)

    return f"{index:02d}-" + "_".join(f"{k.replace('_', '-')}-{_slug(show(v))}"
                                      for k, v in values.items())


def default_sweep_folder(base: TrainConfig, recipe: str | None, keys: list[str]) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"sweep-{_slug(recipe or base.model)}-{'-'.join(keys)}-{stamp}"


def can_chain(config: TrainConfig) -> bool:
    """True when training to N epochs and stopping at M < N gives exactly the M-epoch run
    (lookahead's averaging strength depends on the total steps, so it never chains)."""
    return (config.schedule in EPOCH_INDEPENDENT_SCHEDULES and config.early_stop is None
            and not config.lookahead)


def plan_sweep(base: TrainConfig, vary: list[tuple[str, list[str]]], folder: Path,
               chain: bool = True) -> list[SweepRun]:
    """Every combination as a validated config (errors before any training), with the
    epochs chains marked."""
    if base.resume:
        raise UsageError("sweep: --resume is not supported; a sweep folder that exists is "
                         "continued (finished runs with the same config are kept)")
    keys = [k for k, _ in vary]
    runs: list[SweepRun] = []
    for index, combo in enumerate(itertools.product(*[vals for _, vals in vary]), start=1):
        raw = dict(zip(keys, combo))
        config = apply_overrides(base, raw, source="--vary")
        values = {k: getattr(config, k) for k in keys}
        name = _run_name(index, values)
        config = dataclasses.replace(config, out=str(folder / name), resume=None)
        runs.append(SweepRun(name, values, config))
    seen: dict[str, str] = {}
    for run in runs:  # e.g. --vary lr=0.1,1e-1: two spellings of one value
        key = json.dumps(run.config.to_dict() | {"out": None}, sort_keys=True, default=str)
        if key in seen:
            raise UsageError(f"--vary: runs {seen[key]} and {run.name} have the same config")
        seen[key] = run.name
    if chain and "epochs" in keys:
        groups: dict[str, list[SweepRun]] = {}
        for run in runs:
            others = {k: v for k, v in run.values.items() if k != "epochs"}
            groups.setdefault(json.dumps(others, sort_keys=True, default=str), []).append(run)
        for members in groups.values():
            members.sort(key=lambda r: r.config.epochs)
            for prev, run in zip(members, members[1:]):
                if can_chain(run.config):
                    run.chained_from = prev.name
    return runs


# ----------------------------------------------------------------------------- running
def _copy_run(src: Path, dst: Path) -> None:
    """Copy a finished run folder; checkpoints (replaced atomically, never written in place)
    are hard-linked where the file system allows."""

    def copy(s: str, d: str) -> None:
        if s.endswith(".safetensors"):
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=copy)


def _continue_run(run: SweepRun, folder: Path, progress: bool,
                  command: str | None) -> dict[str, Any]:
    """Copy the previous run of the chain and resume the copy to this run's epochs."""
    from vggkit.workflow import train

    src, dst = folder / run.chained_from, Path(run.config.out)
    _copy_run(src, dst)
    saved = RunFolder(dst).read_config()
    expected = run.config.to_dict()
    for key in FIELDS:  # the copy must be this run's config but for epochs and out
        if key not in ("epochs", "out", "resume", "overwrite") and saved.get(key) != expected[key]:
            raise VggkitError(f"sweep: {src} does not continue into {run.name} ({key} differs)")
    saved.update(epochs=run.config.epochs, out=str(dst))
    RunFolder(dst).write_config(yaml.safe_dump(saved, sort_keys=False))
    return train(TrainConfig(resume=str(dst)), progress=progress, command=command)


def _same_config(run: SweepRun) -> bool:
    """The run folder holds a run of exactly this config."""
    try:
        saved = RunFolder(run.config.out).read_config()
    except VggkitError:
        return False
    want = run.config.to_dict()
    return all(saved.get(k) == want[k] for k in FIELDS if k not in ("out", "resume", "overwrite"))


def _finished(run: SweepRun) -> dict[str, Any] | None:
    """The summary of a run already complete in the folder with exactly this config."""
    try:
        summary = RunFolder(run.config.out).read_summary()
    except VggkitError:
        return None
    if summary and _same_config(run) and summary.get("epochs_completed") == run.config.epochs:
        return summary
    return None


def _interrupted(run: SweepRun) -> bool:
    """An earlier attempt of exactly this run stopped with a checkpoint: resume it."""
    folder = RunFolder(run.config.out)
    return folder.checkpoint("last").is_file() and _same_config(run)


def _write_manifest(folder: Path, runs: list[SweepRun], vary: list[tuple[str, list[str]]],
                    recipe: str | None) -> None:
    data = {"recipe": recipe, "vary": {k: v for k, v in vary},
            "runs": [r.record() for r in runs]}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)


def run_sweep(base: TrainConfig, vary_items: list[str], *, recipe: str | None = None,
              chain: bool = True, progress: bool = True,
              command: str | None = None) -> dict[str, Any]:
    """Plan, validate and run the sweep; returns ``{"folder", "runs", "report", "failed"}``.
    ``base.out`` is the sweep folder (default ``runs/sweep-<recipe>-<keys>-<time>``).
    ``command``: the sweep's command line, recorded in every run's summary.json (each run
    is reproduced by it, so a results row can quote it)."""
    from vggkit.training.trainer import TrainingInterrupted
    from vggkit.workflow import train

    vary = parse_vary(vary_items)
    folder = Path(base.out) if base.out else default_sweep_folder(base, recipe,
                                                                  [k for k, _ in vary])
    runs = plan_sweep(base, vary, folder, chain=chain)  # every error before any training
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise UsageError(f"--out {folder}: folder exists, is not empty and is not a sweep "
                         f"folder (no {MANIFEST})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {folder}: cannot create it ({exc.strerror or exc})") from None
    _write_manifest(folder, runs, vary, recipe)
    log.info("sweep of %d runs into %s", len(runs), folder)

    by_name = {r.name: r for r in runs}
    order = _chain_order(runs)
    interrupted: BaseException | None = None
    for i, run in enumerate(order, start=1):
        done = _finished(run)
        if done is not None:
            run.status, run.summary = "kept", done
            log.info("[%d/%d] %s: already finished, kept", i, len(runs), run.name)
            continue
        prev = by_name.get(run.chained_from) if run.chained_from else None
        if prev is not None and prev.status not in ("done", "kept"):
            run.chained_from = None  # its predecessor failed: train it from scratch
        log.info("[%d/%d] %s%s", i, len(runs), run.name,
                 f" (continues {run.chained_from})" if run.chained_from else "")
        try:
            if _interrupted(run):
                log.info("%s: resuming the interrupted attempt", run.name)
                run.summary = train(TrainConfig(resume=run.config.out), progress=progress,
                                    command=command)
            elif run.chained_from:
                run.summary = _continue_run(run, folder, progress, command)
            else:
                if Path(run.config.out).exists():
                    shutil.rmtree(run.config.out)  # a failed or different earlier attempt
                run.summary = train(run.config, progress=progress, command=command)
            run.status = "done"
        except (TrainingInterrupted, KeyboardInterrupt) as exc:
            run.status, run.error = "failed", f"interrupted: {exc}"
            interrupted = exc
        except VggkitError as exc:
            run.status, run.error = "failed", str(exc)
            log.error("%s failed: %s", run.name, exc)
        except Exception as exc:  # noqa: BLE001 - one run's bug must not lose the others
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("%s failed", run.name)
        _write_manifest(folder, runs, vary, recipe)
        if interrupted is not None:
            for other in runs:
                if other.status == "pending":
                    other.status = "skipped"
            break

    finished = [Path(r.config.out) for r in runs if r.status in ("done", "kept")]
    report: list[str] = []
    if finished:
        from vggkit.evaluation.report import write_report

        try:
            report = [str(p) for p in write_report(finished, folder)]
        except VggkitError as exc:
            log.warning("comparison report not written: %s", exc)
        except Exception as exc:  # noqa: BLE001 - the runs are saved
            log.warning("comparison report not written (a bug; `vggkit report %s --debug` "
                        "shows it): %r", " ".join(map(str, finished)), exc)
    _write_manifest(folder, runs, vary, recipe)
    result = {"folder": str(folder), "runs": [r.record() for r in runs], "report": report,
              "failed": [r.name for r in runs if r.status in ("failed", "skipped")]}
    if interrupted is not None:
        raise interrupted
    return result


def _chain_order(runs: list[SweepRun]) -> list[SweepRun]:
    """The planned order, except that a chained run comes after the run it continues."""
    placed: list[SweepRun] = []
    names: set[str] = set()
    pending = list(runs)
    while pending:
        for run in pending:
            if run.chained_from is None or run.chained_from in names:
                placed.append(run)
                names.add(run.name)
                pending.remove(run)
                break
    return placed


def format_sweep(result: dict[str, Any]) -> str:
    rows = result["runs"]

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"

    def secs(v: Any) -> str:
        return f"{v:.1f}s" if isinstance(v, (int, float)) else "-"

    table = [["run", "values", "test acc", "best acc", "epochs", "time of learning", "status"]]
    for r in rows:
        values = " ".join(f"{k}={v}" for k, v in r["values"].items())
        status = r["status"] + (f" (continues {r['chained_from']})" if r["chained_from"] and
                                r["status"] == "done" else "")
        if r["error"]:
            status += f": {r['error']}"
        table.append([r["name"], values, pct(r["test_acc"]), pct(r["best_val_acc"]),
                      str(r["epochs_completed"] if r["epochs_completed"] is not None else "-"),
                      secs(r["train_seconds"]), status])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
             for row in table]
    lines.append(f"sweep folder {result['folder']}")
    if result["report"]:
        lines.append(f"comparison report {result['report'][0]}")
    return "\n".join(lines)
