"""``vggkit predict``: image files of any size and mode, prepared exactly as the training
images were, give the classes a model overfit to them learned; bad files fail naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.config import TrainConfig
from vggkit.data import load_dataset
from vggkit.data.testing import write_image_folder
from vggkit.errors import DataError, UsageError
from vggkit.evaluation import format_predictions, predict
from vggkit.evaluation.predictor import prepare_image
from vggkit.training.checkpoint import model_from_checkpoint
from vggkit.workflow import train

SIZE = 32  # the model's input side: the digits' 8x8 enlarged by the data pipeline
MODES = ["RGBA", "RGB", "L", "LA", "P", "I;16"]


def save_as(pixels: np.ndarray, path: Path, mode: str) -> Path:
    """A grayscale uint8 (H, W) image saved as a PNG of ``mode``, same visible content."""
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA")
    elif mode == "RGB":
        img = Image.fromarray(np.dstack([pixels] * 3), "RGB")
    elif mode == "LA":
        img = Image.fromarray(np.dstack([pixels, np.full_like(pixels, 255)]), "LA")
    elif mode == "P":
        img = Image.fromarray(pixels, "L").convert("P")
    elif mode == "I;16":
        img = Image.fromarray(pixels.astype(np.uint16) * 257)  # 16-bit grayscale
    else:
        img = Image.fromarray(pixels, "L")
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode or (mode == "I;16" and check.mode.startswith("I"))
    return path


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A VGG-11-BN trained until it knows 20 digits (two a class) by heart (no dropout, and
    enough steps for BatchNorm's running statistics to settle). The digits go through an npz
    file with a 10-image test split, so each epoch's validation is free; the data pipeline
    enlarges them from 8x8 to 32x32. Returns the run, the 8x8 digits and the prepared set."""
    root = tmp_path_factory.mktemp("predict")
    digits = load_dataset("digits", subset=20, val_split=0, progress=False)
    np.savez(root / "digits20.npz", x_train=digits.x_train[:, 0].numpy(),
             y_train=digits.y_train.numpy(), x_test=digits.x_test[:10, 0].numpy(),
             y_test=digits.y_test[:10].numpy())
    config = TrainConfig(model="vgg11_bn", dataset=f"npz:{root / 'digits20.npz'}",
                         image_size=SIZE, epochs=15, batch_size=5, optimizer="adam", lr=1e-3,
                         crop_padding=0, flip=False, cutout=0, val_split=0,
                         precision="fp32", threads=1, out=str(root / "run"), report=False)
    threads = torch.get_num_threads()
    try:
        train(config, progress=False)  # one thread: quicker for a net this small
    finally:
        torch.set_num_threads(threads)
    prepared = load_dataset(config.dataset, image_size=SIZE, val_split=0, progress=False)
    return root / "run", digits, prepared


def test_predict_recognises_the_training_images_at_any_size_and_mode(overfit, tmp_path):
    run, digits, data = overfit
    model, ckpt = model_from_checkpoint(run / "checkpoints" / "last.safetensors")
    # precondition: the network itself knows its 20 training tensors
    mean = torch.tensor(ckpt.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        known = model((data.x_train.float() / 255 - mean) / std).argmax(1)
    assert (known == data.y_train).all(), "the model did not learn its training images"

    # the original 8x8 files, in six modes: prepared exactly as the training tensors were
    native = [save_as(image, tmp_path / f"native{i:02d}.png", MODES[i % len(MODES)])
              for i, image in enumerate(digits.x_train[:, 0].numpy())]
    # the 32x32 training images enlarged 2-4 times, as RGBA
    larger = []
    for i, image in enumerate(data.x_train[:, 0].numpy()):
        factor = 2 + i % 3
        big = np.kron(image, np.ones((factor, factor), np.uint8))
        larger.append(save_as(big, tmp_path / f"large{i:02d}.png", "RGBA"))
    results = predict(run, native + larger, topk=3, device="cpu")
    assert [r["image"] for r in results] == [str(p) for p in native + larger]
    got = [r["predictions"][0]["index"] for r in results]
    assert got == data.y_train.tolist() * 2
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert r["predictions"][0]["class"] == str(r["predictions"][0]["index"])
    json.dumps(results)
    text = format_predictions(results)
    assert str(native[0]) in text and "%" in text


def test_predict_takes_a_checkpoint_file_and_caps_topk(overfit, tmp_path):
    run, digits, _ = overfit
    path = save_as(digits.x_train[0, 0].numpy(), tmp_path / "one.png", "L")
    (result,) = predict(run / "checkpoints" / "last.safetensors", [path], topk=50)
    assert len(result["predictions"]) == 10  # as many as there are classes


def test_predict_errors_name_the_file(overfit, tmp_path, monkeypatch):
    run, digits, _ = overfit
    good = save_as(digits.x_train[0, 0].numpy(), tmp_path / "good.png", "L")
    with pytest.raises(UsageError, match=r"image .*missing\.png: no such file"):
        predict(run, [good, tmp_path / "missing.png"])
    with pytest.raises(UsageError, match="not a file"):
        predict(run, [tmp_path])
    (tmp_path / "notes.png").write_text("not an image at all\n")
    with pytest.raises(DataError, match=r"image .*notes\.png: ") as err:
        predict(run, [tmp_path / "notes.png"])
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=r"truncated\.png"):
        predict(run, [truncated])
    for topk in (0, -1, True):
        with pytest.raises(UsageError, match="--topk"):
            predict(run, [good], topk=topk)
    # Pillow's decompression-bomb limit stays on: lowered here so a small file trips it
    bomb = save_as(np.zeros((64, 64), np.uint8), tmp_path / "bomb.png", "L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"bomb\.png.*(decompression|exceeds limit)"):
        predict(run, [bomb])


# ----------------------------------------------------------------------------- preparation
def test_preparation_equals_the_array_datasets(tmp_path):
    """A digits image saved at its native 8x8 is prepared exactly as load_dataset prepares it,
    to one and to three channels."""
    native = load_dataset("digits", progress=False).x_test[:5, 0].numpy()
    for channels in (1, 3):
        ref = load_dataset("digits", image_size=SIZE, channels=channels, progress=False).x_test
        for i, image in enumerate(native):
            path = save_as(image, tmp_path / f"d{i}.png", "L")
            got = prepare_image(path, channels, SIZE, folder_dataset=False)
            assert got.dtype == np.uint8 and got.shape == (channels, SIZE, SIZE)
            assert np.array_equal(got, ref[i].numpy()), (channels, i)


def test_preparation_equals_the_image_folder_datasets(tmp_path):
    """RGB files of a folder dataset, resized and turned to gray as the folder reader does."""
    root = tmp_path / "folder"
    write_image_folder(root, size=(12, 10), mode="RGB")
    ref = load_dataset(f"folder:{root}", data_dir=tmp_path / "data", image_size=8, channels=1,
                       val_split=0, download=False, progress=False)
    files = sorted((root / "train").rglob("*.png"))
    assert len(files) == len(ref.x_train)
    for path, expected in zip(files, ref.x_train):
        assert np.array_equal(prepare_image(path, 1, 8, folder_dataset=True), expected.numpy())
