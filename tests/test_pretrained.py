"""ImageNet weights by name (``--init-from imagenet``, ``predict imagenet:vgg11``): torchvision's
cache, vggkit's cache, downloads from a local 127.0.0.1 server with torch.hub's hash check, the
mirrors and the offline message. The weights table is pointed at a small generated VGG-11 file
whose name carries its own sha256 prefix, as torchvision's names do."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vggkit.cli import main
from vggkit.config import TrainConfig, resolve_config
from vggkit.data import download as dl
from vggkit.errors import CheckpointError, DataError, UsageError
from vggkit.evaluation import evaluate, format_predictions, predict
from vggkit.models import create_model
from vggkit.models import pretrained as P
from vggkit.training.checkpoint import load_checkpoint
from vggkit.training.trainer import Trainer, resolve_resume
from local_server import LocalServer as Server


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def weights() -> tuple[str, bytes, dict[str, torch.Tensor]]:
    """(file name, bytes, state dict) of a torchvision-layout VGG-11 with 1,000 classes. The
    dense layers' tensors are stride-0 expansions of one column, so the file stays a few MB."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model("vgg11", head="imagenet", num_classes=1000,
                                                      input_size=32).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 4:  # conv: one random value per (out, in) pair, Kaiming-sized
            std = (2.0 / (shape[1] * 9)) ** 0.5
            state[key] = (torch.randn(shape[0], shape[1], 1, 1, generator=g) * std).expand(shape)
        elif len(shape) == 2:
            state[key] = (torch.randn(shape[0], 1, generator=g) * 0.01).expand(shape)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.01
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    return f"vgg11-{hashlib.sha256(blob).hexdigest()[:8]}.pth", blob, state


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch, weights) -> dict[str, Path]:
    """Every cache under tmp_path, the table pointed at the small file, and no real address."""
    env = {"TORCH_HOME": tmp_path / "torch", "XDG_CACHE_HOME": tmp_path / "xdg",
           "HOME": tmp_path / "home"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv(P.URL_ENV, raising=False)
    monkeypatch.delenv(dl.URL_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(dl, "TIMEOUT_S", 10.0)
    monkeypatch.setattr(P, "OFFICIAL_URL", "http://127.0.0.1:9/unreachable/")
    monkeypatch.setitem(P.IMAGENET_WEIGHTS, "vgg11", weights[0])
    return {"torch": tmp_path / "torch" / "hub" / "checkpoints",
            "vggkit": tmp_path / "xdg" / "vggkit" / "weights"}


def put(folder: Path, name: str, blob: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(blob)
    return folder / name


def photo(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- the class names
def test_the_shipped_imagenet_class_names():
    names = P.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[207], names[281], names[999]) == (
        "tench", "goldfish", "golden retriever", "tabby", "toilet tissue")
    # torchvision's two disambiguations of names WordNet repeats.
    assert (names[134], names[517], names[638], names[639]) == (
        "crane bird", "crane", "maillot", "maillot tank suit")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "models/imagenet_classes.txt" in pyproject  # shipped in the wheel


# ----------------------------------------------------------------------------- lookup
@pytest.mark.parametrize("env", ["TORCH_HOME", "XDG_CACHE_HOME", "HOME"])
def test_found_in_torchvisions_cache_without_the_network(env, weights, tmp_path, monkeypatch,
                                                         server):
    """$TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting as torch.hub's."""
    name, blob, _ = weights
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/models/")
    if env != "TORCH_HOME":
        monkeypatch.delenv("TORCH_HOME")
    if env == "HOME":
        monkeypatch.delenv("XDG_CACHE_HOME")
    folder = {"TORCH_HOME": tmp_path / "torch", "XDG_CACHE_HOME": tmp_path / "xdg" / "torch",
              "HOME": tmp_path / "home" / ".cache" / "torch"}[env] / "hub" / "checkpoints"
    path = put(folder, name, blob)
    assert P.imagenet_weights("vgg11") == path
    assert P.imagenet_weights("vgg11") == path  # the second time from the verified record
    assert server.requests == []


def test_found_in_vggkits_cache(weights, caches, server, monkeypatch):
    name, blob, _ = weights
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/models/")
    path = put(caches["vggkit"], name, blob)
    assert P.imagenet_weights("vgg11") == path
    assert server.requests == []


def test_downloaded_once_into_vggkits_cache_with_the_hash_checked(weights, caches, server,
                                                                  monkeypatch):
    name, blob, _ = weights
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/models/")
    server.files[f"/models/{name}"] = blob
    path = P.imagenet_weights("vgg11", progress=False)
    assert path == caches["vggkit"] / name and path.read_bytes() == blob
    assert P.imagenet_weights("vgg11") == path
    assert server.requests == [f"/models/{name}"]  # once
    assert sorted(p.name for p in caches["vggkit"].iterdir()) == sorted([name, P.VERIFIED_FILE])


def test_a_bad_hash_is_refused_and_the_partial_file_removed(weights, caches, server, monkeypatch):
    name, blob, _ = weights
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/models/")
    server.files[f"/models/{name}"] = blob[:-10] + b"0123456789"
    prefix = name.split("-")[1].split(".")[0]
    with pytest.raises(DataError, match=rf"^sha256 mismatch for {name} downloaded from "
                       rf"{server.url}/models/{name}: got [0-9a-f]{{64}}, expected one starting "
                       rf"with {prefix} \(the hash in its name\); the file was removed$"):
        P.imagenet_weights("vgg11", progress=False)
    assert list(caches["vggkit"].iterdir()) == []


def test_a_truncated_cached_file_is_refused_with_the_file_to_delete(weights, caches):
    name, blob, _ = weights
    path = put(caches["torch"], name, blob[: len(blob) // 2])
    with pytest.raises(CheckpointError) as exc:
        P.imagenet_weights("vgg11")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: its sha256 ")
    assert "truncated or damaged" in message and "delete that file" in message
    path.write_bytes(blob)  # the good file: accepted (a new size and time: hashed again)
    assert P.imagenet_weights("vgg11") == path


def test_offline_says_which_file_to_put_where(weights, caches, server, monkeypatch):
    name, _, _ = weights
    server.close()  # nothing listens there any more
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/models/")
    with pytest.raises(CheckpointError) as exc:
        P.imagenet_weights("vgg11", progress=False)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {name} from {server.url}/models/{name} (")
    assert message.endswith(f"); put that file in {caches['torch']}/ (or {caches['vggkit']}/) "
                            "or pass --download-url MIRROR or set $VGGKIT_WEIGHTS_URL")
    assert not caches["vggkit"].exists() or list(caches["vggkit"].iterdir()) == []
    with pytest.raises(CheckpointError, match=rf"^{name} is not in a weights cache and downloads "
                       r"are off; put that file in "):
        P.imagenet_weights("vgg11", download=False)


def test_predict_offline_names_the_environment_variable(weights, server, tmp_path, capsys,
                                                       monkeypatch):
    server.close()
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/")
    assert main(["predict", "imagenet:vgg11", str(photo(tmp_path / "a.png"))]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vggkit: error: cannot download {weights[0]} from ")
    assert err.endswith("or set $VGGKIT_WEIGHTS_URL=MIRROR") and "\n" not in err


def test_mirrors_flag_then_environment_then_official(weights, caches, server, monkeypatch):
    name, blob, _ = weights
    for folder in ("official", "env", "flag"):
        server.files[f"/{folder}/{name}"] = blob
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/official/")
    monkeypatch.setenv(P.URL_ENV, server.url + "/env")
    P.imagenet_weights("vgg11", download_url=server.url + "/flag/", progress=False)
    (caches["vggkit"] / name).unlink()
    P.imagenet_weights("vgg11", progress=False)
    (caches["vggkit"] / name).unlink()
    monkeypatch.delenv(P.URL_ENV)
    P.imagenet_weights("vgg11", progress=False)
    assert server.requests == [f"/flag/{name}", f"/env/{name}", f"/official/{name}"]


def test_a_model_without_imagenet_weights_is_a_clear_error(capsys, server, monkeypatch):
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/")
    with pytest.raises(UsageError, match=r"^no ImageNet weights for model 'vgg_compact'; "
                       r"torchvision publishes them for vgg11, vgg11_bn, vgg13, .*, vgg19_bn$"):
        P.imagenet_weights("vgg_compact")
    with pytest.raises(UsageError, match=r"model 'vgg16bn' \(did you mean 'vgg16_bn'\?\)"):
        P.imagenet_weights("vgg16bn")
    assert main(["train", "--init-from", "imagenet", "--model", "vgg_airbench"]) == 2
    assert ("vggkit: error: --init-from imagenet: no ImageNet weights for model 'vgg_airbench'"
            in capsys.readouterr().err)
    assert main(["predict", "imagenet:vgg_compact", "x.png"]) == 2
    assert "no ImageNet weights for model 'vgg_compact'" in capsys.readouterr().err
    assert server.requests == []


# ----------------------------------------------------------------------------- loading
def test_the_imagenet_head_loads_all_but_a_last_layer_of_another_class_count(weights, caches):
    name, blob, state = weights
    path = put(caches["torch"], name, blob)
    torch.manual_seed(0)
    model = create_model("vgg11", head="imagenet", num_classes=10, input_size=32)
    last = model.classifier[6].weight.detach().clone()
    text = P.load_imagenet(model, path)
    own = model.state_dict()
    for key in ("features.0.weight", "features.18.bias", "classifier.0.weight", "classifier.3.bias"):
        assert torch.equal(own[key], state[key]), key
    assert torch.equal(own["classifier.6.weight"], last)  # re-initialised: left as it was
    assert text == (f"{name}: loaded 20 tensors; the last layer (classifier.6) re-initialised "
                    "for 10 classes (ImageNet's has 1000)")

    gap = create_model("vgg11", head="gap", num_classes=10, input_size=32)
    text = P.load_imagenet(gap, path)
    assert torch.equal(gap.state_dict()["features.3.weight"], state["features.3.weight"])
    assert text.startswith(f"{name}: loaded 16 tensors; not in the file (kept initialised): "
                           "classifier.0.weight")


def test_normalize_imagenet_is_the_default_with_imagenet_weights_unless_given(tmp_path):
    config = resolve_config({"init_from": "imagenet", "model": "vgg11"})
    assert (config.normalize, config.channels) == ("imagenet", 3)
    config = resolve_config({"init_from": "imagenet", "model": "vgg11", "normalize": "meanstd",
                             "channels": "1"})
    assert (config.normalize, config.channels) == ("meanstd", 1)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("init_from: imagenet\nnormalize: unit\n")
    assert resolve_config({"model": "vgg16"}, config_file=yaml_file).normalize == "unit"
    assert resolve_config({"model": "vgg16"}).normalize == "meanstd"
    assert P.imagenet_mean_std(3) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_train_init_from_imagenet_end_to_end_and_its_resume_downloads_nothing(
        weights, caches, server, tmp_path, capsys):
    name, blob, state = weights
    server.files[f"/mirror/{name}"] = blob
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "vgg11", "--init-from", "imagenet",
            "--download-url", server.url + "/mirror", "--epochs", "1", "--subset", "64",
            "--val-split", "20", "--batch-size", "64", "--lr", "1e-9", "--schedule", "constant",
            "--no-report", "--no-health", "--precision", "fp32", "--out", str(run)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"--init-from imagenet: {name}: loaded 16 tensors; not in the file" in err
    assert server.requests == [f"/mirror/{name}"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["init_from"], saved["normalize"], saved["channels"]) == ("imagenet", "imagenet", 3)
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ckpt.meta["mean"] == pytest.approx(list(P.IMAGENET_MEAN))
    assert ckpt.meta["std"] == pytest.approx(list(P.IMAGENET_STD))
    assert ckpt.meta["image_shape"][0] == 3
    # At a learning rate of 1e-9 the convolutions are still ImageNet's.
    assert torch.allclose(ckpt.model_state["features.0.weight"].float(),
                          state["features.0.weight"], atol=1e-6)

    # A resume sets the run up from its own checkpoint: no weights file is looked for.
    (caches["vggkit"] / name).unlink()
    server.close()
    config, checkpoint = resolve_resume(TrainConfig(resume=str(run), epochs=2), {"resume", "epochs"})
    assert config.init_from == "imagenet" and checkpoint is not None
    trainer = Trainer(config, checkpoint, progress=False)
    assert trainer.state.epoch == 1
    assert torch.equal(trainer.model.state_dict()["features.0.weight"],
                       ckpt.model_state["features.0.weight"])


# ----------------------------------------------------------------------------- predict, evaluate
def test_predict_imagenet_model_names_imagenet_classes(weights, caches, tmp_path, capsys):
    name, blob, _ = weights
    put(caches["torch"], name, blob)
    image = photo(tmp_path / "cat.png")
    names = P.imagenet_classes()
    assert main(["predict", "imagenet:vgg11", str(image), "--json", "--topk", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    shown = results[0]["predictions"]
    assert len(shown) == 3 and all(p["class"] == names[p["index"]] for p in shown)
    assert f"1. {names[shown[0]['index']]}" in format_predictions(results)

    own = tmp_path / "names.txt"
    own.write_text("".join(f"c{i}\n" for i in range(1000)))
    result = predict("imagenet:vgg11", [image], topk=1, classes_file=own)[0]["predictions"][0]
    assert result["class"] == f"c{result['index']}"


def test_evaluate_imagenet_model_needs_a_dataset_before_any_download(server, monkeypatch):
    monkeypatch.setattr(P, "OFFICIAL_URL", server.url + "/")
    with pytest.raises(UsageError, match=r"^--dataset: imagenet:vgg11 is torchvision weights"):
        evaluate("imagenet:vgg11")
    assert server.requests == []
