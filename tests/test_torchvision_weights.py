"""torchvision-layout VGG weights (.pth) wherever a checkpoint goes: predict, export and
evaluate build the architecture the keys and shapes say, with ImageNet's preprocessing, and
give what the same network built by vggkit gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.cli import main
from vggkit.data.testing import write_image_folder
from vggkit.errors import CheckpointError, UsageError
from vggkit.evaluation import evaluate, predict
from vggkit.evaluation.runs import IMAGENET_MEAN, IMAGENET_STD, load_model
from vggkit.models import create_model, torchvision_architecture

NAMES = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
CLASSES = 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [1000, 10])
def test_architecture_is_told_from_keys_and_shapes(name, num_classes):
    with torch.device("meta"):  # shapes only: no 500 MB of weights per case
        model = create_model(name, head="imagenet", input_size=224, num_classes=num_classes)
    assert torchvision_architecture(model.state_dict(), "w.pth") == (name, 3, num_classes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A VGG-11-BN with the imagenet head saved as torchvision saves a state dict, with
    BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model = create_model("vgg11_bn", head="imagenet", input_size=224, num_classes=CLASSES)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("tv") / "vgg11_bn.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def expected_probabilities(model: torch.nn.Module, image: Path) -> torch.Tensor:
    """torchvision's ImageNet recipe written out: resize the shorter side to 256, center crop
    224 (one bilinear resampling of the centered square of 87.5% of the shorter side), /255,
    ImageNet mean and std."""
    with Image.open(image) as img:
        pixels = np.asarray(img.convert("RGB"))
    h, w = pixels.shape[:2]
    side = round(0.875 * min(h, w))  # 42 of 48: integer-aligned for the 64x48 test photo
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.tensor(pixels, dtype=torch.float64).permute(2, 0, 1)[None, :, top:top + side, left:left + side]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).softmax(1)[0]


def photo(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_gives_the_vggkit_networks_probabilities(weights, tmp_path, capsys):
    path, model = weights
    image = photo(tmp_path / "img.JPG.png")
    result = predict(path, [image], topk=CLASSES)[0]
    want = expected_probabilities(model, image)
    got = {p["class"]: p["probability"] for p in result["predictions"]}
    assert sorted(got) == ["0", "1", "2"]  # no names in the file: the indices
    for i in range(CLASSES):
        assert got[str(i)] == pytest.approx(float(want[i]), abs=1e-5)

    names = tmp_path / "names.txt"
    names.write_text("ant\nbee\n\ncat\n")
    assert main(["predict", str(path), str(image), "--classes", str(names), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {p["class"] for p in shown} == {"ant", "bee", "cat"}


def test_classes_file_must_name_every_class(weights, tmp_path):
    path, _ = weights
    names = tmp_path / "two.txt"
    names.write_text("ant\nbee\n")
    with pytest.raises(UsageError, match=r"--classes .*two\.txt: 2 names, but the weights have 3"):
        load_model(path, names)
    with pytest.raises(UsageError, match=r"--classes .*missing\.txt: cannot read it"):
        load_model(path, tmp_path / "missing.txt")


def test_export_of_torchvision_weights_matches_pytorch(weights, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, model = weights
    assert main(["export", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 0
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["vggkit.image_shape"]) == [3, 224, 224]
    assert json.loads(meta["vggkit.mean"]) == pytest.approx(IMAGENET_MEAN)
    assert json.loads(meta["vggkit.classes"]) == ["0", "1", "2"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(session.run(["logits"], {"input": x.numpy()})[0] - want).max() < 1e-4


def test_evaluate_needs_a_dataset_whose_classes_are_the_weights(weights, tmp_path):
    path, _ = weights
    src = tmp_path / "ants"
    write_image_folder(src, classes=("ant", "bee", "cat"), per_class=1, test_per_class=1, size=(20, 16))
    with pytest.raises(UsageError, match=r"--dataset: .*vgg11_bn\.pth is torchvision weights"):
        evaluate(path, out_dir=tmp_path / "o")
    with pytest.raises(UsageError, match=r"--dataset folder:.*3 classes \(ant, bee, cat\) differ"):
        evaluate(path, dataset=f"folder:{src}", data_dir=str(tmp_path / "d"), out_dir=tmp_path / "o")
    names = tmp_path / "names.txt"
    names.write_text("ant\nbee\ncat\n")
    result = evaluate(path, dataset=f"folder:{src}", data_dir=str(tmp_path / "d"),
                      out_dir=tmp_path / "o", classes_file=names, precision="fp32")
    assert result["n"] == 3 and result["classes"] == ["ant", "bee", "cat"]
    assert Path(result["paths"]["csv"]).is_file()


def test_a_pth_that_is_not_vgg_weights_is_a_clear_error(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, other)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a VGG state dict in torchvision's layout"):
        predict(other, [photo(tmp_path / "a.png")])
    odd = tmp_path / "odd.pt"
    torch.save({"features.0.weight": torch.zeros(32, 3, 3, 3), "features.0.bias": torch.zeros(32)}, odd)
    with pytest.raises(CheckpointError, match=r"odd\.pt: its 1 convolutions \(widths 32\) are not"):
        load_model(odd)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    assert main(["export", str(garbage), "--onnx", str(tmp_path / "g.onnx")]) == 1
    with pytest.raises(CheckpointError, match=r"cannot read weights from .*garbage\.pth: not a torch.save "
                       r"file of tensors that loads without running code \(Unsupported operand \d+\)$"):
        load_model(garbage)


def test_headless_vgg_weights_name_the_missing_classifier(tmp_path):
    with torch.device("meta"):
        model = create_model("vgg11", head="imagenet", input_size=224)
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "features.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"features\.pth: vgg11's convolutions but not torchvision's classifier"):
        load_model(path)
