"""Photo folders: aspect-kept, memory-mapped decoded cache; crops per batch; streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vggkit.cli import main
from vggkit.data import Loader, load_dataset
from vggkit.data import loader as L
from vggkit.data import testing as T
from vggkit.data.photo import PhotoCrop
from vggkit.data.sources import photos as ph
from vggkit.data.store import MappedImages
from vggkit.training.checkpoint import load_checkpoint


def test_photos_keep_their_aspect_ratio_in_a_memory_mapped_cache(tmp_path: Path) -> None:
    sizes = T.write_photo_folder(tmp_path / "p", per_class=6, test_per_class=2)
    ds = load_dataset(f"folder:{tmp_path / 'p'}", data_dir=tmp_path / "d", image_size=32, val_split=0)
    assert isinstance(ds.x_train, MappedImages) and isinstance(ds.x_train.array, np.memmap)
    side = 40  # 1.25 x the crop of 32
    assert ds.image_shape == (3, side, side)
    expected = [sizes[f"train/{c}/{j:04d}.png"] for c in ("blue", "red") for j in range(6)]
    for (h, w), got in zip(expected, ds.x_train.sizes().tolist()):
        scale = min(1.0, side / max(h, w))  # the longer side fitted, never enlarged
        assert got == [max(1, round(h * scale)), max(1, round(w * scale))]
        assert abs(got[1] / got[0] - w / h) < 0.1  # the aspect ratio is kept
    canvas = ds.x_train.gather(torch.arange(len(ds.x_train)))
    for (h, w), image in zip(ds.x_train.sizes().tolist(), canvas):
        assert image[:, h:, :].eq(0).all() and image[:, :, w:].eq(0).all()  # top-left placement
        assert image[:, :h, :w].float().mean() > 20
    again = load_dataset(f"folder:{tmp_path / 'p'}", data_dir=tmp_path / "d", image_size=32, val_split=0)
    assert again.from_cache and torch.equal(again.x_train.gather(torch.arange(12)), canvas)


def test_parallel_decode_equals_the_sequential_one(tmp_path: Path) -> None:
    T.write_photo_folder(tmp_path / "p", per_class=40, test_per_class=2, fmt="JPEG")
    caches = []
    for workers in (1, 2):
        raw = ph.load_photo_folder(tmp_path / "p", image_size=32, stored_size=None, channels=None,
                                   skip_bad_images=False, cache_dirs=[tmp_path / f"c{workers}"],
                                   progress=False, workers=workers)
        caches.append((raw.x_train.load(), raw.x_train.sizes(), raw.y_train))
    for a, b in zip(*caches):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_a_uniform_folder_keeps_the_in_memory_path(tmp_path: Path) -> None:
    T.write_image_folder(tmp_path / "u")
    ds = load_dataset(f"folder:{tmp_path / 'u'}", data_dir=tmp_path / "d")
    assert isinstance(ds.x_train, torch.Tensor) and ds.image_shape == (3, 10, 12)


def _batches(loader: Loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


@pytest.mark.parametrize("photo", [False, True])
def test_streamed_batches_equal_resident_ones(tmp_path: Path, photo: bool) -> None:
    if photo:
        T.write_photo_folder(tmp_path / "p", per_class=10, test_per_class=2)
        ds = load_dataset(f"folder:{tmp_path / 'p'}", data_dir=tmp_path / "d", image_size=24)
        crop = PhotoCrop(train=True, size=24, flip=True)
        kw = dict(photo=crop, augment=L.Augment(cutout=4))
    else:
        ds = load_dataset("digits")
        kw = dict(augment=L.Augment(crop_padding=2, flip=True, cutout=3))
    made = {p: Loader(ds.x_train, ds.y_train, 7, shuffle=True, seed=3, mean=ds.mean, std=ds.std,
                      placement=p, **kw) for p in ("device", "stream")}
    assert made["device"].placement == "device" and made["stream"].placement == "stream"
    for epoch in (0, 1):
        resident, streamed = _batches(made["device"], epoch), _batches(made["stream"], epoch)
        assert len(resident) == len(streamed) == len(made["device"])
        for (x1, y1), (x2, y2) in zip(resident, streamed):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # mid-epoch resume (start=2) is the tail of the full pass
    tail = [x for x, _ in made["stream"].epoch(1, start=2)]
    assert all(torch.equal(a, b) for a, (b, _) in zip(tail, _batches(made["device"], 1)[2:]))


def test_photo_crops_differ_per_image_and_repeat_per_seed(tmp_path: Path) -> None:
    T.write_photo_folder(tmp_path / "p", per_class=8, test_per_class=2)
    ds = load_dataset(f"folder:{tmp_path / 'p'}", data_dir=tmp_path / "d", image_size=16, val_split=0)
    same = torch.arange(len(ds.x_train)) * 0  # one photo, many crops
    images = ds.x_train[np.zeros(16, dtype=np.int64)]
    def crops(seed):
        loader = Loader(images, same[:16], 16, shuffle=False, seed=seed, mean=ds.mean, std=ds.std,
                        photo=PhotoCrop(train=True, size=16, flip=True))
        return next(iter(loader.epoch(0)))[0]
    a, b = crops(0), crops(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, crops(1))
    flat = a.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) >= 12  # crops differ from image to image


def test_placement_follows_the_free_memory(monkeypatch) -> None:
    monkeypatch.setattr(L, "free_memory", lambda device: 1000)
    assert L.choose_placement(200, torch.device("cpu")) == "device"
    assert L.choose_placement(300, torch.device("cpu")) == "stream"  # over a quarter: streamed
    assert L.choose_placement(300, torch.device("cpu"), "device") == "device"  # asked for
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 30, 16 << 30))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 30, 16 << 30))
    assert L.free_memory(torch.device("cuda")) == 4 << 30
    assert L.choose_placement(2 << 30, torch.device("cuda")) == "stream"
    assert L.choose_placement(512 << 20, torch.device("cuda")) == "device"


def test_prefetch_raises_the_builders_error_and_stops_early() -> None:
    built = []

    def build(i):
        built.append(i)
        if i == 3:
            raise ValueError("bad batch 3")
        return i

    with pytest.raises(ValueError, match="bad batch 3"):
        list(L.prefetched(build, range(10), 2))
    built.clear()
    gen = L.prefetched(lambda i: built.append(i) or i, range(1000), 2)
    assert next(gen) == 0
    gen.close()  # leaving early stops the thread: it does not build the other 998
    assert len(built) < 10


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    code = main(["train", "--dataset", f"folder:{tmp_path / 'p'}", "--data-dir", str(tmp_path / "d"),
                 "--model", "vgg11_bn", "--head", "gap", "--image-size", "32", "--epochs", "4",
                 "--batch-size", "16", "--lr", "0.02", "--precision", "fp32", "--no-report",
                 "--random-resized-crop", "--crop-scale", "0.35,1", "--flip", "--val-split", "4",
                 "--out", str(out), *extra])
    assert code == 0
    return out


def test_photo_run_learns_and_streams_to_the_same_weights(tmp_path: Path, capsys) -> None:
    T.write_photo_folder(tmp_path / "p", per_class=24, test_per_class=8, sides=(30, 90))
    resident = _train(tmp_path, "memory", "--data-placement", "device")
    assert "images, " in (err := capsys.readouterr().err) and "decoded: held in memory" in err
    streamed = _train(tmp_path, "stream", "--data-placement", "stream")
    assert "decoded: streamed from the memory-mapped cache" in capsys.readouterr().err
    a, b = (json.loads((r / "summary.json").read_text()) for r in (resident, streamed))
    assert a["test_acc"] >= 0.85  # red against blue photos: well above the 50% of chance
    assert a["test_acc"] == b["test_acc"]
    wa = load_checkpoint(resident / "checkpoints" / "last.safetensors").model_state
    wb = load_checkpoint(streamed / "checkpoints" / "last.safetensors").model_state
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = load_checkpoint(resident / "checkpoints" / "last.safetensors").meta
    assert meta["photo"] == {"stored_side": 40, "crop_pct": 0.875} and meta["image_shape"] == [3, 32, 32]


def test_evaluate_and_predict_take_the_runs_eval_crop(tmp_path: Path, capsys) -> None:
    T.write_photo_folder(tmp_path / "p", per_class=16, test_per_class=6, sides=(30, 90))
    run = _train(tmp_path, "run")
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test_acc"])
    photo = tmp_path / "p" / "test" / "red" / "0000.png"
    assert main(["predict", str(run), str(photo), "--json"]) == 0
    from vggkit.evaluation.predictor import prepare_images

    meta = load_checkpoint(run / "checkpoints" / "last.safetensors").meta
    pixels = prepare_images([photo], meta)
    ds = load_dataset(f"folder:{tmp_path / 'p'}", data_dir=tmp_path / "d", image_size=32,
                      photos=True, val_split=4)
    crop = PhotoCrop(train=False, size=32, flip=False)
    k = int(np.flatnonzero(ds.y_test.numpy() == 1)[0])  # the first red test photo
    one = ds.x_test[np.array([k])]
    expected = crop.apply(one.load(), crop.params(one.sizes(), torch.Generator()))
    assert np.array_equal(pixels[0], expected.round().clamp(0, 255).to(torch.uint8)[0].numpy())


def test_init_from_a_run_of_other_classes_resets_the_last_layer(tmp_path: Path) -> None:
    T.write_photo_folder(tmp_path / "p", per_class=8, test_per_class=2)
    source = _train(tmp_path, "source")
    renamed = tmp_path / "q"
    import shutil

    for split in ("train", "test"):
        for old, new in (("blue", "sky"), ("red", "fire")):
            shutil.copytree(tmp_path / "p" / split / old, renamed / split / new)
    common = ["--model", "vgg11_bn", "--head", "gap", "--image-size", "32", "--epochs", "1",
              "--batch-size", "16", "--precision", "fp32", "--no-report", "--lr", "1e-9",
              "--init-from", str(source), "--data-dir", str(tmp_path / "d")]
    for name, data in (("same", tmp_path / "p"), ("other", renamed)):
        assert main(["train", "--dataset", f"folder:{data}", "--out", str(tmp_path / name), *common]) == 0
    src = load_checkpoint(source / "checkpoints" / "best.safetensors").model_state
    same = load_checkpoint(tmp_path / "same" / "checkpoints" / "last.safetensors").model_state
    other = load_checkpoint(tmp_path / "other" / "checkpoints" / "last.safetensors").model_state
    w = "classifier.0.weight"
    assert torch.allclose(same[w], src[w], atol=1e-6)  # the same classes keep the trained head
    assert not torch.allclose(other[w], src[w], atol=1e-3)  # other classes: a fresh last layer
    assert torch.allclose(other["features.0.weight"], src["features.0.weight"], atol=1e-6)
