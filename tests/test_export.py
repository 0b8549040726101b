"""``vggkit export --onnx``: a dynamic batch dimension, onnxruntime checked against PyTorch,
class names and preprocessing in the file, and no file left behind or overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vggkit.config import TrainConfig
from vggkit.errors import UsageError, VggkitError
from vggkit.evaluation import export as E
from vggkit.evaluation.export import export_onnx
from vggkit.models import create_model
from vggkit.training.checkpoint import model_from_checkpoint, save_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def make_checkpoint(path: Path, name: str = "vgg_compact", channels: int = 1, size: int = 8,
                    classes: int = 10) -> Path:
    """A checkpoint as the trainer writes it, of freshly initialised weights with BatchNorm
    statistics that are not the identity (so folding them into the graph is exercised)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=channels, input_size=size)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    config = TrainConfig(model=name, dataset="digits").to_dict()
    meta = {"config": config, "classes": [f"class {i}" for i in range(classes)],
            "mean": [0.3] * channels, "std": [0.25] * channels,
            "image_shape": [channels, size, size],
            "model": {"name": name, "head": model.head, "num_classes": classes,
                      "in_channels": channels, "input_size": size, "dropout": 0.5},
            "dataset": {"name": "digits", "source": "", "train": 1, "test": 1, "val": 0}}
    return save_checkpoint(path, model.state_dict(), meta)


@pytest.mark.parametrize("name,channels,size", [("vgg_compact", 1, 8), ("vgg11_bn", 3, 32)])
def test_export_has_a_dynamic_batch_and_matches_pytorch(tmp_path, name, channels, size):
    ckpt = make_checkpoint(tmp_path / "model.safetensors", name, channels, size)
    result = export_onnx(ckpt, tmp_path / "out" / "model.onnx")
    path = Path(result["path"])
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert result["input_shape"] == ["batch", channels, size, size]
    assert result["opset"] == E.DEFAULT_OPSET
    assert 0 <= result["max_abs_diff"] < 1e-4 and result["checked_batch"] == 8
    json.dumps(result)
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [channels, size, size]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["vggkit.classes"])[3] == "class 3"
    assert json.loads(meta["vggkit.mean"]) == [0.3] * channels

    # any batch size, independently of the check inside export_onnx
    model, _ = model_from_checkpoint(ckpt)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4


def test_export_of_a_run_folder_uses_its_final_weights(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.safetensors")
    (run / "config.yaml").write_text("model: vgg_compact\n")
    result = export_onnx(run, tmp_path / "run.onnx", batch=3)
    assert result["checked_batch"] == 3 and result["max_abs_diff"] < 1e-4


def test_export_never_overwrites_unless_asked(tmp_path):
    ckpt = make_checkpoint(tmp_path / "model.safetensors")
    target = tmp_path / "model.onnx"
    target.write_bytes(b"someone's file")
    with pytest.raises(UsageError, match=r"--onnx .*model\.onnx: file exists; pass --overwrite"):
        export_onnx(ckpt, target)
    assert target.read_bytes() == b"someone's file"
    export_onnx(ckpt, target, overwrite=True)
    onnx.checker.check_model(onnx.load(str(target)))
    with pytest.raises(UsageError, match="is a folder"):
        export_onnx(ckpt, tmp_path)
    with pytest.raises(UsageError, match="--opset 3"):
        export_onnx(ckpt, tmp_path / "x.onnx", opset=3)
    with pytest.raises(VggkitError, match="missing"):
        export_onnx(tmp_path / "missing.safetensors", tmp_path / "y.onnx")


def test_a_failed_check_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "model.safetensors")
    real = E.check_onnx

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) + 2e-4

    monkeypatch.setattr(E, "check_onnx", off_by_a_little)
    with pytest.raises(E.ExportError, match=r"differ by 2\.\d+e-04 .* > 1e-04"):
        export_onnx(ckpt, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_dynamo_exporter_is_the_fallback(tmp_path, monkeypatch):
    """If the TorchScript exporter fails, the dynamo one writes a file that passes the check."""
    ckpt = make_checkpoint(tmp_path / "model.safetensors")
    real = torch.onnx.export

    def no_torchscript(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("TorchScript exporter unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    result = export_onnx(ckpt, tmp_path / "model.onnx")
    assert result["exporter"] == "dynamo" and result["max_abs_diff"] < 1e-4
