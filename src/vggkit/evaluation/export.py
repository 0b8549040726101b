"""``vggkit export --onnx``: ONNX with a dynamic batch dimension, checked at once with
onnxruntime against PyTorch on a batch of another size than the one traced."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggkit.errors import UsageError, VggkitError
from vggkit.evaluation.runs import load_model

log = logging.getLogger("vggkit.export")

DEFAULT_OPSET = 17
TOLERANCE = 1e-4  # max abs difference of fp32 logits
TRACE_BATCH = 2


class ExportError(VggkitError):
    """The exporter failed, or onnxruntime disagrees with PyTorch."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f"--onnx needs the {module} package: pip install 'vggkit[onnx]'") from None


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write the ONNX file; returns which exporter wrote it. The TorchScript exporter first
    (robust for these plain feed-forward nets), the dynamo exporter if it fails."""
    names = {"input_names": ["input"], "output_names": ["logits"]}
    errors = []
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True, **names)
        return "torchscript"
    except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one
        errors.append(f"TorchScript exporter: {type(exc).__name__}: {exc}")
    try:
        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=({0: batch},), **names)
            program.save(str(path))
        return "dynamo"
    except Exception as exc:  # noqa: BLE001
        errors.append(f"dynamo exporter: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed: " + "; ".join(e.splitlines()[0] for e in errors))


def _add_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Class names and preprocessing in the ONNX file's metadata, so the file alone says how
    to prepare an image and read the output."""
    import onnx

    proto = onnx.load(str(path))
    entries = {
        "vggkit.classes": json.dumps(meta["classes"]),
        "vggkit.mean": json.dumps(meta["mean"]),
        "vggkit.std": json.dumps(meta["std"]),
        "vggkit.image_shape": json.dumps(meta["image_shape"]),
        "vggkit.model": json.dumps(meta["model"]),
        "vggkit.preprocessing": "uint8 pixels / 255, minus mean, divided by std, per channel; "
                                "NCHW float32",
    }
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def check_onnx(path: Path, model: torch.nn.Module, input_shape: list[int], batch: int) -> float:
    """Max abs difference between onnxruntime's and PyTorch's fp32 logits on a random batch."""
    ort = _require("onnxruntime")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=generator)
    with torch.no_grad():
        expected = model(x).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime returned shape {got.shape} for a batch of {batch}, "
                          f"PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def export_onnx(checkpoint: str | Path, out_path: str | Path, *, opset: int | None = None,
                check: bool = True, batch: int = 8, overwrite: bool = False,
                classes_file: str | Path | None = None) -> dict[str, Any]:
    """Export a checkpoint (or a run's final weights) to ONNX, fp32, batch dimension dynamic;
    then run a batch of ``batch`` random inputs through onnxruntime and PyTorch and fail if
    their logits differ by more than 1e-4. A file that fails the check is removed.
    ``checkpoint`` may also be torchvision-layout VGG weights (.pth/.pt); ``classes_file``
    names their classes in the file's metadata."""
    _require("onnx")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UsageError(f"--onnx {out_path}: is a folder; give a file name like model.onnx")
    if out_path.exists() and not overwrite:
        raise UsageError(f"--onnx {out_path}: file exists; pass --overwrite to replace it")
    if batch < 1:
        raise UsageError(f"export check batch must be a positive integer, got {batch}")
    opset = DEFAULT_OPSET if opset is None else opset
    if not 7 <= opset <= 23:
        raise UsageError(f"--opset {opset}: choose an ONNX opset between 7 and 23 (default "
                         f"{DEFAULT_OPSET})")
    model, ckpt = load_model(checkpoint, classes_file)
    model = model.float().eval()
    input_shape = [int(v) for v in ckpt.meta["image_shape"]]
    trace_batch = TRACE_BATCH if batch != TRACE_BATCH else TRACE_BATCH + 1
    example = torch.randn(trace_batch, *input_shape, generator=torch.Generator().manual_seed(1))
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--onnx {out_path}: cannot create its folder ({exc.strerror})") from None
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        exporter = _export(model, example, tmp, opset)
        _add_metadata(tmp, ckpt.meta)
        max_abs_diff = check_onnx(tmp, model, input_shape, batch) if check else None
        if max_abs_diff is not None and not max_abs_diff <= TOLERANCE:
            raise ExportError(
                f"--onnx {out_path}: onnxruntime and PyTorch differ by {max_abs_diff:.2e} (max "
                f"abs, fp32 logits, batch of {batch}) > {TOLERANCE:.0e}; the file was not written")
        if out_path.exists() and not overwrite:  # created meanwhile by someone else
            raise UsageError(f"--onnx {out_path}: file exists; pass --overwrite to replace it")
        os.replace(tmp, out_path)
    except OSError as exc:
        raise UsageError(f"--onnx {out_path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s with the %s exporter", out_path, exporter)
    return {
        "path": str(out_path),
        "max_abs_diff": max_abs_diff,
        "opset": opset,
        "input_shape": ["batch", *input_shape],
        "exporter": exporter,
        "checked_batch": batch if check else None,
    }
