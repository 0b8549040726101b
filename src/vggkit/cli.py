"""Command-line interface: argument parsing only; each command calls one API function.

The flags of ``vggkit train`` are generated from ``vggkit.config.TrainConfig``, so a flag
and a ``--config`` YAML key are the same thing (``--batch-size`` <-> ``batch_size``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from vggkit import __version__
from vggkit.errors import UsageError, VggkitError

log = logging.getLogger("vggkit")


# ----------------------------------------------------------------------------- helpers
def parse_input_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' (or '32' for 3x32x32) -> (3, 32, 32)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--input {text!r}: expected CxHxW like 3x32x32") from None
    if len(values) == 1:
        values = [3, values[0], values[0]]
    if len(values) != 3 or values[1] != values[2] or min(values) < 1:
        raise UsageError(f"--input {text!r}: expected a square CxHxW like 3x32x32 or 1x64x64")
    return values[0], values[1], values[2]


def command_line(command: str) -> str:
    """The command as the user typed it (for summary.json): ``vggkit train --epochs 5``."""
    import shlex

    argv = sys.argv[1:]
    if command in argv:  # drop global flags before the command, keep the rest verbatim
        argv = argv[argv.index(command):]
    return "vggkit " + " ".join(shlex.quote(a) for a in argv)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, not as it was at set-up: a caller
    that replaces stderr later (pytest's capture, ``redirect_stderr``, a notebook) gets the
    logs, and a closed old stream is never written to."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # what StreamHandler's __init__ is given: unused
        pass


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("vggkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from vggkit.config import load_config_file, resolve_config
    from vggkit.workflow import train

    flags = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS}
    config = resolve_config(flags, config_file=args.config, recipe=args.recipe)
    # What the user set, so that `--resume RUN --epochs 12` counts even where 12 is a default.
    explicit = set(flags) | (set(load_config_file(args.config, warn=False)) if args.config else set())
    summary = train(config, progress=not args.quiet, explicit=explicit,
                    command=command_line("train"))
    if args.json:
        print_json(summary)
    else:
        acc = f"test accuracy {100 * summary['test_acc']:.2f}%"
        print(f"{acc}  time of learning {summary['train_seconds']:.1f}s  run {summary['run']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vggkit.config import resolve_config
    from vggkit.sweep import format_sweep, run_sweep

    flags = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS}
    config = resolve_config(flags, config_file=args.config, recipe=args.recipe)
    result = run_sweep(config, args.vary, recipe=args.recipe, chain=args.chain,
                       progress=not args.quiet, command=command_line("sweep"))
    print_json(result) if args.json else print(format_sweep(result))
    return 1 if result["failed"] else 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from vggkit.config import resolve_config
    from vggkit.training.lr_find import lr_find, plot

    flags = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS and k != "lr"}
    config = resolve_config(flags, config_file=args.config, recipe=args.recipe)
    found = lr_find(config, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr,
                    progress=not args.quiet)
    path = plot(found, args.plot)
    if args.json:
        print_json({"suggestion": found.suggestion, "plot": str(path),
                    "lrs": found.lrs, "losses": found.losses})
    else:
        print(f"suggested --lr {found.suggestion:.3g}  (loss against rate: {path})")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from vggkit.models import create_model, format_summary, summary_dict

    c, h, _ = parse_input_shape(args.input)
    model = create_model(args.model, num_classes=args.classes, in_channels=c, input_size=h,
                         head=args.head)
    info = summary_dict(model, (c, h, h), name=args.model)
    print_json(info) if args.json else print(format_summary(info))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from vggkit.models import ARCHITECTURES, count_parameters, create_model

    c, h, _ = parse_input_shape(args.input)
    rows = []
    for name, arch in ARCHITECTURES.items():
        head = args.head or arch.default_head
        try:
            counts = count_parameters(create_model(name, num_classes=args.classes, in_channels=c,
                                                   input_size=h, head=head))
        except UsageError as exc:
            counts = {"error": str(exc)}
        rows.append({"model": name, "head": head, **counts, "description": arch.description})
    if args.json:
        print_json(rows)
        return 0
    print(f"input {c}x{h}x{h}, {args.classes} classes")
    print(f"{'model':<13}{'head':<10}{'total':>14}{'trainable':>14}  description")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<13}{r['head']:<10}{'-':>14}{'-':>14}  {r['error']}")
        else:
            print(f"{r['model']:<13}{r['head']:<10}{r['total']:>14,}{r['trainable']:>14,}  "
                  f"{r['description']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from vggkit.data import list_datasets

    rows = list_datasets(args.data_dir)
    if args.json:
        print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    for r in rows:
        mark = "-" if r.get("kind") == "path" else "present" if r["present"] else "missing"
        print(f"{r['name']:<{width}}{mark:<9}{r['location']}  {r.get('description', '')}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from vggkit.recipes import list_recipes, load_recipe

    recipes = list_recipes()
    if args.json:
        print_json({name: {"description": d, "config": load_recipe(name)}
                    for name, d in recipes.items()})
        return 0
    width = max((len(n) for n in recipes), default=0) + 2
    for name, description in recipes.items():
        print(f"{name:<{width}}{description}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vggkit.evaluation import evaluate, format_evaluation

    result = evaluate(args.run, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                      tta=args.tta, tta_translate=args.tta_translate, out_dir=args.out,
                      device=args.device, precision=args.precision, batch_size=args.batch_size,
                      classes_file=args.classes)
    print_json(result) if args.json else print(format_evaluation(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from vggkit.evaluation.report import write_report
    from vggkit.runfolder import RunFolder

    runs = [Path(r) for r in args.runs]
    for run in runs:
        folder = RunFolder(run)
        if not folder.summary_path.is_file() and not folder.metrics_path.is_file():
            raise UsageError(f"{run}: not a run folder (no summary.json or metrics.jsonl)")
    out = Path(args.out) if args.out else (
        runs[0] if len(runs) == 1 else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_report(runs, out)
    for p in paths:
        print(p)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from vggkit.evaluation import results

    if args.action == "collect":
        dest = results.collect(args.run, args.name, experiment=args.experiment, into=args.into,
                               overwrite=args.overwrite)
        print(dest)
        return 0
    if args.check and not args.readme:
        raise UsageError("--check compares the table with a README: give --readme FILE")
    if not args.readme:
        print(results.build_table(args.dir))
        return 0
    current = results.update_readme(args.dir, args.readme, check=args.check)
    if args.check and not current:
        print(f"vggkit: error: {args.readme}: the results table is not the one {args.dir} gives; "
              f"run `vggkit results table {args.dir} --readme {args.readme}`", file=sys.stderr)
        return 1
    print(f"{args.readme}: results table {'up to date' if current else 'updated'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vggkit.evaluation import format_predictions, predict

    if args.cam_class is not None and args.cam is None:
        raise UsageError("--cam-class: give --cam OUTDIR too (the folder for the heat maps)")
    results = predict(args.checkpoint, args.images, topk=args.topk, device=args.device,
                      classes_file=args.classes)
    if args.cam is not None:
        from vggkit.evaluation.cam import write_cams

        cams = write_cams(args.checkpoint, args.images, args.cam, class_name=args.cam_class,
                          classes_file=args.classes)
        for result, cam in zip(results, cams):
            result["cam"] = {"path": cam["cam"], "class": cam["class"]}
    print_json(results) if args.json else print(format_predictions(results))
    if args.cam is not None and not args.json:
        for result in results:
            print(f"Grad-CAM of {result['cam']['class']}: {result['cam']['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.onnx and not args.keras:
        raise UsageError("export: give --onnx FILE, --keras FILE.keras, or both")
    if args.onnx:
        from vggkit.evaluation.export import export_onnx

        result = export_onnx(args.checkpoint, args.onnx, opset=args.opset,
                             overwrite=args.overwrite, classes_file=args.classes)
        print(f"wrote {result['path']} (opset {result['opset']}, input {result['input_shape']}); "
              f"onnxruntime vs PyTorch max abs difference {result['max_abs_diff']:.2e}")
    if args.keras:
        from vggkit.evaluation.keras_export import export_keras

        result = export_keras(args.checkpoint, args.keras, overwrite=args.overwrite,
                              classes_file=args.classes)
        print(f"wrote {result['path']} ({result['layers']} Keras layers, input "
              f"{result['input_shape']}); Keras vs PyTorch max abs difference "
              f"{result['max_abs_diff']:.2e}")
    return 0


def cmd_import_keras(args: argparse.Namespace) -> int:
    from vggkit.keras_import import import_keras

    r = import_keras(args.model, args.out, normalize=args.normalize, classes=args.classes,
                     dataset=args.dataset, overwrite=args.overwrite)
    if args.json:
        print_json(r)
        return 0
    what = (f"{r['model']} with the {r['head']} head" if r["matched"] else
            "an exact PyTorch equivalent (no registered network matches it layer for layer)")
    print(f"imported {args.model} as {what}: {r['params']:,} parameters, {r['num_classes']} "
          f"classes, input {'x'.join(map(str, r['input']))} -> {r['run']}")
    return 0


# ----------------------------------------------------------------------------- parser
_TRAIN_FIELDS: set[str] = set()
_GROUP_TITLES = {
    "model": "model", "data": "data", "augmentation": "augmentation (whole batch, on device)",
    "photos": "photos (kept at their aspect ratio, cropped per batch on the device)",
    "training": "optimisation", "finetune": "fine-tuning", "engine": "engine", "output": "output",
}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults suppressed so that only flags the user
    gave override the recipe and the config file."""
    from vggkit.config import TrainConfig, field_type

    groups = {k: parser.add_argument_group(v) for k, v in _GROUP_TITLES.items()}
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        _TRAIN_FIELDS.add(f.name)
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        base, _ = field_type(f.name)
        default = getattr(defaults, f.name)
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, list) else default
        help_text = f"{meta['help']} (default: {shown})"
        group = groups[meta["group"]]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("const") is not None:
            kwargs.update(nargs="?", const=meta["const"])
        # Values stay strings here; config.coerce converts them with messages naming the flag.
        group.add_argument(flag, **kwargs)
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (keys = flag "
                        "names with underscores); flags given here override it")
    parser.add_argument("--recipe", metavar="NAME", help="start from a named recipe "
                        "(`vggkit recipes`); the config file and flags override it")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


IMAGENET_ARG_HELP = ("imagenet:MODEL is torchvision's ImageNet weights for MODEL (e.g. "
                     "imagenet:vgg16_bn), found in torch's cache or downloaded once "
                     "($VGGKIT_WEIGHTS_URL: a mirror)")


def add_classes_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", metavar="FILE",
                        help="for torchvision VGG weights (.pth/.pt): class names, one a line "
                        "(default: \"0\"..\"N-1\"; ImageNet's for imagenet:MODEL)")


class Parser(argparse.ArgumentParser):
    """argparse with a did-you-mean for mistyped flags (Python 3.12 has its own)."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            from vggkit.errors import did_you_mean

            parsers = [self] + [p for a in self._actions
                                if isinstance(a, argparse._SubParsersAction)
                                for p in a.choices.values()]
            known = sorted({o for p in parsers for a in p._actions for o in a.option_strings
                            if o.startswith("--")})
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    hint = did_you_mean(word.split("=")[0], known)
                    if hint:
                        message += hint
                        break
        super().error(message)


def add_ship_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``export`` and ``import-keras``: networks out of vggkit and into it."""
    p = command("export", "export to ONNX (checked against PyTorch with onnxruntime) or to a "
                "Keras 3 file (checked with Keras)", cmd_export)
    p.add_argument("checkpoint", metavar="CHECKPOINT|RUN|WEIGHTS.pth|imagenet:MODEL",
                   help=IMAGENET_ARG_HELP)
    p.add_argument("--onnx", metavar="FILE", help="output .onnx file")
    p.add_argument("--keras", metavar="FILE.keras", help="output Keras 3 file (needs keras; "
                   "its torch backend will do)")
    p.add_argument("--opset", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_classes_flag(p)

    p = command("import-keras", "a Keras .keras or .h5 model and its weights as a vggkit run "
                "folder (read without TensorFlow; no code in the file is run)", cmd_import_keras)
    p.add_argument("model", metavar="MODEL.keras|MODEL.h5")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder to write")
    p.add_argument("--dataset", required=True, help="the dataset whose classes the model "
                   "predicts (evaluate and report test on it), e.g. cifar10")
    p.add_argument("--normalize", default="unit", choices=("unit", "imagenet"),
                   help="the input the model was trained on: pixels / 255 (the write-ups') or "
                   "ImageNet's mean/std (default: unit)")
    p.add_argument("--classes", metavar="FILE", help="class names, one a line, in output order "
                   "(default: the dataset's, for cifar10, mnist, fashion-mnist and digits)")
    p.add_argument("--overwrite", action="store_true", help="replace the run folder's files")
    p.add_argument("--json", action="store_true")


def add_training_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``train``, ``sweep`` and ``lr-find``: each takes every train flag."""
    p = command("train", "train a model and write a run folder (no arguments: a small VGG on "
                "the embedded digits set)", cmd_train)
    add_train_flags(p)

    p = command("sweep", "train one run per value of --vary (or per combination of several), "
                "then write one comparison report", cmd_sweep)
    p.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a train option and its values, e.g. epochs=10,20,50,100 (repeat for a "
                   "cartesian product; ';' separates values of betas)")
    p.add_argument("--no-chain", dest="chain", action="store_false",
                   help="train every epochs value from scratch even when the schedule does "
                   "not depend on the total epochs (the default then continues the shorter "
                   "run, which gives the same result)")
    add_train_flags(p)

    p = command("lr-find", "learning-rate range test on the train flags: a throw-away copy "
                "of the model, the rate growing exponentially; prints the suggested --lr and "
                "plots loss against rate", cmd_lr_find)
    p.add_argument("--steps", type=int, default=200, help="steps of the test (default 200)")
    p.add_argument("--start-lr", type=float, default=1e-6, help="first rate (default 1e-6)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last rate (default 10)")
    p.add_argument("--plot", default="lr-find.png", help="the PNG of loss against rate "
                   "(default lr-find.png)")
    add_train_flags(p)


def add_evaluation_commands(command: Callable[..., argparse.ArgumentParser],
                            common: argparse.ArgumentParser) -> None:
    """``evaluate``, ``report``, ``results`` and ``predict``: what a run is worth."""
    p = command("evaluate", "accuracy, per-class metrics and confusion matrix of a run or "
                "checkpoint", cmd_evaluate)
    p.add_argument("run", metavar="RUN|CHECKPOINT|WEIGHTS.pth|imagenet:MODEL",
                   help=IMAGENET_ARG_HELP)
    p.add_argument("--dataset", help="evaluate on another dataset (default: the run's; needed "
                   "for torchvision weights)")
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped view")
    p.add_argument("--tta-translate", type=int, metavar="N",
                   help="with --tta, also average the views shifted by N pixels, as training's "
                   "final test (default: the run's own value when trained with --tta, else 0)")
    p.add_argument("--out", help="folder for confusion_matrix.csv/.png (default: the run folder)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="default: the run's own, so that its test accuracy is reproduced")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_classes_flag(p)

    p = command("report", "HTML + Markdown report of one run, or a comparison of several",
                cmd_report)
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", help="output folder (default: the run folder, or "
                   "runs/compare-<timestamp> for several runs)")

    p = command("results", "the README's results table: collect a run's small artefacts into "
                "docs/results/, then build the table from them", cmd_results)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=help, description=help, parents=[common])
        q.__class__ = Parser
        return q

    q = action("collect", "copy a finished run's config, metrics, summary, report, confusion "
               "matrix and learning curves into DIR/NAME/ (never checkpoints or predictions)")
    q.add_argument("run", metavar="RUN")
    q.add_argument("--name", required=True, help="folder name under --into (letters, digits, "
                   "'.', '_', '-')")
    q.add_argument("--experiment", metavar="TEXT", help="what the run is, for the table's first "
                   "column (kept in DIR/NAME/experiment.yaml; default: NAME)")
    q.add_argument("--into", default="docs/results", metavar="DIR",
                   help="folder of collected runs (default: docs/results)")
    q.add_argument("--overwrite", action="store_true", help="replace DIR/NAME/ when it holds "
                   "another run")
    q = action("table", "one Markdown table of every collected run in DIR; printed, or written "
               "into a README between its marker lines")
    q.add_argument("dir", nargs="?", default="docs/results", metavar="DIR",
                   help="folder of collected runs (default: docs/results)")
    q.add_argument("--readme", metavar="FILE", help="replace the table between the "
                   "results-table:begin and :end marker lines of FILE")
    q.add_argument("--check", action="store_true", help="with --readme: write nothing; exit 1 "
                   "if FILE's table differs from the generated one")

    p = command("predict", "class probabilities for image files", cmd_predict)
    p.add_argument("checkpoint", metavar="CHECKPOINT|RUN|WEIGHTS.pth|imagenet:MODEL",
                   help=IMAGENET_ARG_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cam", metavar="OUTDIR", help="also write OUTDIR/<image>-cam.png: the "
                   "image with its Grad-CAM heat map of the top class overlaid")
    p.add_argument("--cam-class", metavar="NAME", help="with --cam: the heat map of this "
                   "class instead of the top one")
    p.add_argument("--json", action="store_true")
    add_classes_flag(p)


def add_info_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``summary``, ``models``, ``datasets`` and ``recipes``: what vggkit has."""
    p = command("summary", "Keras-style layer table with output shapes and parameter counts",
                cmd_summary)
    p.add_argument("model")
    p.add_argument("--input", default="3x32x32", metavar="CxHxW")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--head")
    p.add_argument("--json", action="store_true")

    p = command("models", "list the registered networks with their parameter counts",
                cmd_models)
    p.add_argument("--input", default="3x32x32", metavar="CxHxW")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--head", help="count with this head instead of each model's default")
    p.add_argument("--json", action="store_true")

    p = command("datasets", "list the datasets, where they are looked for, and whether "
                "they are present", cmd_datasets)
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")

    p = command("recipes", "list the named training recipes", cmd_recipes)
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = Parser(
        prog="vggkit", parents=[common],
        description="Train, evaluate and ship VGG-family image classifiers.")
    parser.add_argument("--version", action="version", version=f"vggkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.__class__ = Parser
        p.set_defaults(func=func)
        return p

    add_training_commands(command)
    add_evaluation_commands(command, common)
    add_ship_commands(command)
    add_info_commands(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return run_command(argv)
        finally:  # also after --help's SystemExit: a closed pipe shows up here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        # `vggkit ... | head`: the reader is gone. Say nothing, as Unix tools do, and keep
        # the interpreter's final flush from raising again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, the status of a tool that the pipe's signal ended


def run_command(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        return args.func(args)
    except VggkitError as exc:
        if args.debug:
            raise
        print(f"vggkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("vggkit: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        # torch.OutOfMemoryError (CUDA) is a RuntimeError; other RuntimeErrors are bugs.
        if args.debug or not (isinstance(exc, MemoryError) or "out of memory" in str(exc)):
            raise
        print("vggkit: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 1
