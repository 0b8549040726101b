"""Every dataset format written small and read back exactly, plus the preparation options."""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vggkit.data import DATASET_NAMES, Dataset, list_datasets
from vggkit.data import load_dataset as _load_dataset
from vggkit.data import testing as T

# These tests read files back exactly: no validation split unless a test asks for one.
load_dataset = functools.partial(_load_dataset, val_split=0)
from vggkit.data.sources.cifar import CIFAR10
from vggkit.errors import DataError, UsageError


def _eq(t: torch.Tensor, a: np.ndarray) -> bool:
    return t.dtype == torch.from_numpy(np.ascontiguousarray(a)).dtype and torch.equal(t, torch.from_numpy(np.ascontiguousarray(a)))


def _check(ds: Dataset, arrays: dict[str, np.ndarray], y_key: str = "y") -> None:
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert _eq(ds.x_train, arrays["x_train"]) and _eq(ds.y_train, arrays[f"{y_key}_train"])
    assert _eq(ds.x_test, arrays["x_test"]) and _eq(ds.y_test, arrays[f"{y_key}_test"])


# --- CIFAR ------------------------------------------------------------------------------------

@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "extracted"])
def test_cifar10_reads_back_exactly(tmp_path: Path, archive: bool) -> None:
    arrays = T.write_cifar(tmp_path, "cifar10", archive=archive)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    _check(ds, arrays)
    assert ds.classes == T.CIFAR10_CLASSES
    assert ds.image_shape == (3, 32, 32) and ds.num_classes == 10 and ds.name == "cifar10"
    assert len(ds.y_train) == 100 and len(ds.y_test) == 20
    assert ds.source.endswith("cifar-10-python.tar.gz" if archive else "cifar-10-batches-py")


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    arrays = T.write_cifar(tmp_path, "cifar100")
    fine = load_dataset("cifar100", data_dir=tmp_path, download=False)
    coarse = load_dataset("CIFAR100_coarse", data_dir=tmp_path, download=False)  # names are forgiving
    _check(fine, arrays)
    assert fine.num_classes == 100 and fine.classes[7] == "fine07"
    _check(coarse, arrays, y_key="coarse")
    assert coarse.num_classes == 20 and coarse.classes[3] == "coarse03" and coarse.name == "cifar100-coarse"


def test_cifar_batch_missing_key_names_file(tmp_path: Path) -> None:
    members, _ = T.cifar10_files()
    members[f"{CIFAR10.folder}/data_batch_3"] = T.py2_pickle({"data": np.zeros((2, 3072), np.uint8)})
    for name, blob in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=r"data_batch_3: batch file is missing key\(s\) 'labels'"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("bad", ["shape", "labels", "range"])
def test_cifar_batch_bad_content(tmp_path: Path, bad: str) -> None:
    members, _ = T.cifar10_files()
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}
    if bad == "shape":
        batch["data"] = np.zeros((2, 100), np.uint8)
    elif bad == "labels":
        batch["labels"] = [1]
    else:
        batch["labels"] = [1, 10]
    members[f"{CIFAR10.folder}/test_batch"] = T.py2_pickle(batch)
    for name, blob in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar_truncated_archive(tmp_path: Path) -> None:
    blob, _ = T.cifar_archive_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: truncated or corrupt archive"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar_garbage_archive(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"this is not a tar file at all" * 10)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# --- IDX --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mnist-gz", "mnist-raw", "torchvision"])
def test_mnist_layouts(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / ("MNIST/raw" if layout == "torchvision" else "mnist")
    arrays = T.write_mnist(folder, gz=layout != "mnist-raw")
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    _check(ds, arrays)
    assert ds.image_shape == (1, 28, 28) and ds.classes == [str(i) for i in range(10)]


def test_fashion_mnist(tmp_path: Path) -> None:
    arrays = T.write_mnist(tmp_path / "fashion-mnist", seed=3)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    _check(ds, arrays)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def _idx_dir(tmp_path: Path, name: str, blob: bytes) -> Path:
    T.write_mnist(tmp_path / "mnist", gz=False)
    for f in (tmp_path / "mnist").iterdir():
        if f.name == name:
            f.write_bytes(blob)
    return tmp_path / "mnist" / name


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = _idx_dir(tmp_path, "train-images-idx3-ubyte", b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(DataError, match=rf"{path}: wrong magic number"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_wrong_length(tmp_path: Path) -> None:
    good = T.idx_bytes(np.zeros((60, 28, 28), np.uint8))
    path = _idx_dir(tmp_path, "train-images-idx3-ubyte", good[:-5])
    with pytest.raises(DataError, match=rf"{path}: truncated"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    path.write_bytes(good + b"xx")
    with pytest.raises(DataError, match=rf"{path}: wrong length"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    path = _idx_dir(tmp_path, "t10k-labels-idx1-ubyte", T.idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match=rf"{path}: 19 labels for 20 images"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    T.write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=rf"{path}"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# --- npz --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3), (3, 16, 16)], ids=["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arrays = T.write_npz(tmp_path / "d.npz", shape=shape)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", data_dir=tmp_path)
    x = arrays["x_train"]
    want = x[:, None] if x.ndim == 3 else (x.transpose(0, 3, 1, 2) if shape[-1] == 3 else x)
    assert _eq(ds.x_train, want)
    assert _eq(ds.y_train, arrays["y_train"].astype(np.int64))
    assert ds.name == f"npz:{(tmp_path / 'd.npz').resolve()}"


def test_npz_class_names_and_column_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "k.npz", x_train=rng.random((6, 8, 8)).astype(np.float32), y_train=np.array([[0], [1], [2], [0], [1], [2]]),
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.array([[1], [2]]), classes=np.array(["a", "b", "c"]))
    ds = load_dataset(f"npz:{tmp_path / 'k.npz'}")
    assert ds.classes == ["a", "b", "c"] and ds.y_train.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.x_train.dtype == torch.uint8 and int(ds.x_train.max()) <= 255


def test_npz_missing_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"m\.npz: missing array\(s\) x_test, y_test"):
        load_dataset(f"npz:{tmp_path / 'm.npz'}")


def test_npz_refuses_object_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x_train=np.array([None, 1], dtype=object), y_train=np.zeros(2, np.int64),
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="object arrays are not allowed"):
        load_dataset(f"npz:{tmp_path / 'o.npz'}")


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.npz: npz file not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


# --- digits -----------------------------------------------------------------------------------

def test_digits_fixed_split() -> None:
    a = load_dataset("digits", seed=1)
    b = load_dataset("digits", seed=2)
    assert len(a.y_train) + len(a.y_test) == 1797 and len(a.y_test) == 359
    assert torch.equal(a.x_test, b.x_test), "the test split must not depend on the training seed"
    assert a.x_train.dtype == torch.uint8 and int(a.x_train.max()) == 255 and a.image_shape == (1, 8, 8)
    # Stratified: every class is in the test split in proportion.
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


# --- image folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("as_zip", [False, True], ids=["dir", "zip"])
def test_folder_reads_back_exactly(tmp_path: Path, as_zip: bool, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / ("imgs.zip" if as_zip else "imgs")
    arrays = T.write_image_folder(src, as_zip=as_zip, top="mydata" if as_zip else None)
    data = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="vggkit.data"):
        ds = load_dataset(f"folder:{src}", data_dir=data)
    assert not ds.from_cache
    assert ds.classes == ["cat", "dog", "eel"]
    assert _eq(ds.x_train, arrays["x_train"]) and _eq(ds.y_train, arrays["y_train"])
    assert _eq(ds.x_test, arrays["x_test"]) and _eq(ds.y_test, arrays["y_test"])
    assert any(p.name.startswith("folder-") for p in (data / "cache").iterdir())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vggkit.data"):
        again = load_dataset(f"folder:{src}", data_dir=data)
    assert again.from_cache and "decoded-image cache" in caplog.text
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_folder_cache_invalidated_by_change(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    T.write_image_folder(src)
    load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    extra = src / "train" / "cat" / "zz.png"
    extra.write_bytes((src / "train" / "cat" / "0000.png").read_bytes())
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    assert not ds.from_cache and len(ds.y_train) == 13


def test_a_zip_copied_again_finds_its_cache_and_a_changed_one_does_not(tmp_path: Path) -> None:
    """A session copies the data afresh (a new mtime, maybe a new path): the cache follows the
    archive's content. A load at the images' own size (a report, at the run's) reuses the entry
    decoded without a size."""
    src = tmp_path / "a.zip"
    T.write_image_folder(src, as_zip=True, size=(10, 10))
    data = tmp_path / "d"
    first = load_dataset(f"folder:{src}", data_dir=data)
    copy = tmp_path / "elsewhere" / "a.zip"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    os.utime(copy, ns=(10**9, 10**9))
    again = load_dataset(f"folder:{copy}", data_dir=data)
    assert again.from_cache and torch.equal(again.x_train, first.x_train)
    entries = sorted((data / "cache").iterdir())
    sized = load_dataset(f"folder:{copy}", data_dir=data, image_size=10)
    assert sized.from_cache and sorted((data / "cache").iterdir()) == entries
    assert torch.equal(sized.x_train, first.x_train)
    assert not load_dataset(f"folder:{copy}", data_dir=data, image_size=8).from_cache
    T.write_image_folder(copy, as_zip=True, size=(10, 10), seed=1)  # other pixels
    changed = load_dataset(f"folder:{copy}", data_dir=data)
    assert not changed.from_cache and not torch.equal(changed.x_train, first.x_train)


def test_folder_grayscale_bmp_and_val_names(tmp_path: Path) -> None:
    src = tmp_path / "g"
    arrays = T.write_image_folder(src, fmt="BMP", mode="L")
    os.rename(src / "test", src / "Val")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    assert ds.image_shape == (1, 10, 12)
    assert _eq(ds.x_test, arrays["x_test"])


def test_folder_single_set_holds_out_fixed_test(tmp_path: Path) -> None:
    src = tmp_path / "s"
    T.write_image_folder(src, per_class=10, test_per_class=None)
    a = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", seed=1)
    b = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", seed=2)
    assert len(a.y_test) == 6 and len(a.y_train) == 24 and a.x_val is None
    assert torch.bincount(a.y_test).tolist() == [2, 2, 2]
    assert torch.equal(a.x_test, b.x_test)
    # the validation split comes out of the remaining 80%, never out of the test part
    c = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", val_split=0.5)
    assert (len(c.y_test), len(c.y_val), len(c.y_train)) == (6, 12, 12)
    assert torch.equal(c.x_test, a.x_test)


def test_folder_jpeg_resized(tmp_path: Path) -> None:
    src = tmp_path / "j.zip"
    T.write_image_folder(src, fmt="JPEG", size=(40, 30), as_zip=True)
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", image_size=16)
    assert ds.image_shape == (3, 16, 16)
    # the test images, in reading order, are each JPEG decoded and resized as Pillow does it
    import io

    from PIL import Image

    with zipfile.ZipFile(src) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("test/"))
        expected = []
        for name in names:
            with Image.open(io.BytesIO(zf.read(name))) as img:
                img.draft("RGB", (16, 16))
                small = img.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
            expected.append(np.asarray(small).transpose(2, 0, 1))
    assert ds.x_test.dtype == torch.uint8
    assert torch.equal(ds.x_test, torch.from_numpy(np.stack(expected)))
    assert ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]  # cat, dog, eel: two test images each


def test_folder_of_mixed_sizes_is_a_photo_folder_kept_at_its_aspect_ratio(tmp_path: Path) -> None:
    src = tmp_path / "m"
    T.write_image_folder(src)  # 12x10 images
    from PIL import Image

    Image.new("RGB", (7, 7)).save(src / "train" / "dog" / "odd.png")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    # No squashing: canvases of 1.25 x the median shorter side (10), capped at the longest side
    assert ds.image_shape == (3, 12, 12) and len(ds.y_train) == 13
    assert sorted(set(map(tuple, ds.x_train.sizes().tolist()))) == [(7, 7), (10, 12)]
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", image_size=8)
    assert ds.image_shape == (3, 10, 10) and len(ds.y_train) == 13  # 1.25 x 8
    assert (10, 10) not in set(map(tuple, ds.x_train.sizes().tolist()))  # 12x10 -> 10 wide, 8 high


def test_folder_bad_image_errors_or_skips(tmp_path: Path) -> None:
    src = tmp_path / "b"
    T.write_image_folder(src)
    (src / "train" / "dog" / "notes.txt").write_text("not an image")
    good = (src / "test" / "eel" / "0001.png").read_bytes()
    (src / "test" / "eel" / "0001.png").write_bytes(good[: len(good) // 2])
    (src / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored
    with pytest.raises(DataError, match=r"notes\.txt: not a JPEG/PNG/PPM/BMP/TIFF/WEBP/GIF image \(2 bad files in all\).*--skip-bad-images"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", skip_bad_images=True)
    assert len(ds.skipped) == 2 and any("notes.txt: not a JPEG/PNG/PPM/BMP/TIFF/WEBP/GIF image" in s for s in ds.skipped)
    assert any("eel/0001.png: corrupt image" in s for s in ds.skipped)
    assert len(ds.y_train) == 12 and len(ds.y_test) == 5
    # The cache remembers the skipped files: without the flag it is still an error.
    with pytest.raises(DataError, match="--skip-bad-images"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


def test_folder_empty_class(tmp_path: Path) -> None:
    src = tmp_path / "e"
    T.write_image_folder(src)
    (src / "test" / "fox").mkdir()
    (src / "train" / "fox").mkdir()
    with pytest.raises(DataError, match=r"fox: empty class folder"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


def test_folder_class_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "c.zip"
    T.write_image_folder(src, as_zip=True)
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr("test/fox/0.png", zf.read("test/eel/0000.png"))
    with pytest.raises(DataError, match=r"c\.zip.*class folders differ.*only in test: fox"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


def test_folder_zip_refuses_unsafe_members(tmp_path: Path) -> None:
    src = tmp_path / "u.zip"
    T.write_image_folder(src, as_zip=True)
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(DataError, match=r"u\.zip: refusing archive member '\.\./evil\.png'"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


def test_folder_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt: neither a folder nor a \.zip"):
        load_dataset(f"folder:{tmp_path / 'x.txt'}", data_dir=tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(f"folder:{tmp_path / 'missing'}", data_dir=tmp_path)


def test_folder_corrupt_zip(tmp_path: Path) -> None:
    src = tmp_path / "z.zip"
    T.write_image_folder(src, as_zip=True)
    blob = src.read_bytes()
    src.write_bytes(blob[: len(blob) - 40])  # cuts the central directory
    with pytest.raises(DataError, match=r"z\.zip"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


# --- preparation ------------------------------------------------------------------------------

def test_resize_channels_and_stats(tmp_path: Path) -> None:
    T.write_mnist(tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, download=False, image_size=32, channels=3)
    assert ds.x_train.shape == (60, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])
    x = ds.x_train.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-9)


def test_rgb_to_gray_uses_bt601(tmp_path: Path) -> None:
    arrays = T.write_cifar(tmp_path, "cifar10")
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False, channels=1)
    x = arrays["x_train"].astype(np.float64)
    want = np.rint(0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert ds.image_shape == (1, 32, 32)
    assert np.abs(ds.x_train[:, 0].numpy().astype(np.float64) - want).max() <= 1


def test_resize_is_antialiased() -> None:
    from vggkit.data.prepare import resize

    # A one-pixel checkerboard averages to mid-grey when shrunk; naive subsampling keeps 0/255.
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8)
    small = resize(board.expand(2, 1, 16, 16), 4)
    assert small.shape == (2, 1, 4, 4) and (small.float() - 127.5).abs().max() < 2


def test_subset_and_val_split(tmp_path: Path) -> None:
    T.write_mnist(tmp_path / "mnist", n_train=200)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False, subset=30, val_split=0.2, seed=5)
    assert len(ds.y_train) == 30 and len(ds.y_val) == 40 and ds.x_val is not None
    counts = torch.bincount(ds.y_train, minlength=10)
    assert counts.min() == 3 and counts.max() == 3  # balanced
    full = load_dataset("mnist", data_dir=tmp_path, download=False)
    train_rows = {r.tobytes() for r in ds.x_train.numpy()}
    assert not train_rows & {r.tobytes() for r in ds.x_val.numpy()}, "val is held out of train"
    assert train_rows <= {r.tobytes() for r in full.x_train.numpy()}
    same = load_dataset("mnist", data_dir=tmp_path, download=False, subset=30, val_split=0.2, seed=5)
    other = load_dataset("mnist", data_dir=tmp_path, download=False, subset=30, val_split=0.2, seed=6)
    assert torch.equal(same.x_train, ds.x_train) and torch.equal(same.x_val, ds.x_val)
    assert not torch.equal(other.x_train, ds.x_train)


@pytest.mark.parametrize("kwargs,flag", [
    ({"image_size": 0}, "--image-size"), ({"channels": 2}, "--channels"), ({"subset": 0}, "--subset"),
    ({"val_split": 1.5}, "--val-split"), ({"val_split": -0.1}, "--val-split"),
    ({"subset": 10_000}, "--subset 10000"),
])
def test_bad_options_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    T.write_mnist(tmp_path / "mnist")
    with pytest.raises(UsageError, match=flag):
        load_dataset("mnist", data_dir=tmp_path, download=False, **kwargs)


def test_unknown_name_suggests() -> None:
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar11' \(did you mean 'cifar10'\?\)"):
        load_dataset("cifar11")


def test_list_datasets(tmp_path: Path) -> None:
    T.write_cifar(tmp_path, "cifar10")
    rows = {r["name"]: r for r in list_datasets(tmp_path)}
    assert set(DATASET_NAMES) <= set(rows) and "folder:PATH" in rows and "npz:PATH" in rows
    assert rows["cifar10"]["present"] and rows["cifar10"]["location"] == str(tmp_path / "cifar-10-python.tar.gz")
    assert not rows["mnist"]["present"] and rows["mnist"]["location"] == str(tmp_path / "mnist")
    assert rows["digits"]["present"]


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    T.write_mnist(tmp_path / "mnist")
    monkeypatch.setenv("VGGKIT_DATA", str(tmp_path))
    assert len(load_dataset("mnist", download=False).y_train) == 60


def test_gz_magic_not_extension(tmp_path: Path) -> None:
    """A gzip file without .gz and a raw file are both recognised by content."""
    T.write_mnist(tmp_path / "mnist", gz=False)
    p = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    p.write_bytes(gzip.compress(p.read_bytes()))
    assert len(load_dataset("mnist", data_dir=tmp_path, download=False).y_test) == 20


def test_folder_image_modes(tmp_path: Path) -> None:
    """Palette and RGBA images become RGB; 16-bit grey keeps its top 8 bits."""
    from PIL import Image

    src = tmp_path / "modes"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (src / split / cls).mkdir(parents=True)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(src / "train" / "a" / "rgba.png")
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8), "RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(
        src / "train" / "b" / "pal.png")
    Image.fromarray(np.full((4, 4), 0xABCD, np.uint16)).save(src / "test" / "a" / "grey16.png")
    Image.fromarray(np.full((4, 4), 9, np.uint8), "L").save(src / "test" / "b" / "grey.bmp")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    assert ds.image_shape == (3, 4, 4)
    assert ds.x_train[0, :, 0, 0].tolist() == [200, 0, 0] and ds.x_train[1, :, 0, 0].tolist() == [7, 7, 7]
    assert ds.x_test[0, :, 0, 0].tolist() == [0xAB] * 3 and ds.x_test[1, :, 0, 0].tolist() == [9] * 3


def test_folder_symlinked_class_folders(tmp_path: Path) -> None:
    real = tmp_path / "real"
    arrays = T.write_image_folder(real)
    linked = tmp_path / "linked"
    (linked / "train").mkdir(parents=True)
    (linked / "test").symlink_to(real / "test")
    for cls in ("cat", "dog", "eel"):
        (linked / "train" / cls).symlink_to(real / "train" / cls)
    ds = load_dataset(f"folder:{linked}", data_dir=tmp_path / "d")
    assert _eq(ds.x_train, arrays["x_train"]) and _eq(ds.x_test, arrays["x_test"])


def test_numpy_integers_accepted(tmp_path: Path) -> None:
    T.write_mnist(tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, download=False, image_size=np.int64(16), subset=np.int32(20))
    assert ds.image_shape == (1, 16, 16) and len(ds.y_train) == 20


def test_folder_cache_falls_back_to_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "imgs"
    T.write_image_folder(src)
    data = tmp_path / "data"
    data.mkdir()
    (data / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset(f"folder:{src}", data_dir=data)
    assert any((tmp_path / "xdg" / "vggkit" / "decoded").iterdir())
    assert load_dataset(f"folder:{src}", data_dir=data).from_cache


def test_folder_without_any_writable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "imgs"
    arrays = T.write_image_folder(src)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cache").write_text("x")
    (tmp_path / "xdg").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "data")
    assert _eq(ds.x_train, arrays["x_train"]) and not ds.from_cache


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    arrays = T.write_image_folder(src)
    load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    (entry,) = [e for e in (tmp_path / "d" / "cache").iterdir() if e.is_dir()]
    (entry / "x_train.npy").write_bytes(b"garbage")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    assert not ds.from_cache and _eq(ds.x_train, arrays["x_train"])
    assert load_dataset(f"folder:{src}", data_dir=tmp_path / "d").from_cache, "the rebuilt entry is used next time"


# --- every format torchvision's ImageFolder reads, plus GIF ------------------------------------

def _random(shape: tuple[int, ...], seed: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _format_files() -> dict[str, tuple[bytes, np.ndarray]]:
    """File name -> (bytes Pillow wrote, the (H, W, 3) uint8 pixels the reader must give).
    Lossy formats are compared with Pillow's own decoding of the same bytes; 16-bit grey with
    its top 8 bits (Pillow's conversion would clip at 255)."""
    import io as _io

    from PIL import Image, features

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = _io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    def pillow_rgb(blob: bytes) -> np.ndarray:
        with Image.open(_io.BytesIO(blob)) as img:
            return np.asarray(img.convert("RGB"))

    rgb = _random((10, 12, 3), 1)
    grey16 = _random((10, 12), 2, np.uint16, 65536)
    out: dict[str, tuple[bytes, np.ndarray]] = {}
    out["a.JPG"] = (blob := save(Image.fromarray(rgb), "JPEG"), pillow_rgb(blob))
    out["b.jpeg"] = (blob := save(Image.fromarray(rgb).convert("CMYK"), "JPEG"), pillow_rgb(blob))
    out["c.Png"] = (save(Image.fromarray(rgb), "PNG"), rgb)
    rgba = np.dstack([rgb, _random((10, 12), 3)])
    out["d-rgba.png"] = (save(Image.fromarray(rgba, "RGBA"), "PNG"), rgb)  # alpha dropped
    la = np.dstack([rgb[..., 0], _random((10, 12), 4)])
    out["e-la.png"] = (save(Image.fromarray(la, "LA"), "PNG"), np.repeat(rgb[..., :1], 3, 2))
    out["f.ppm"] = (save(Image.fromarray(rgb), "PPM"), rgb)
    out["g16.PGM"] = (save(Image.fromarray(grey16), "PPM"), np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    palette = Image.fromarray(rgb).quantize(16)
    out["h-palette.bmp"] = (save(palette, "BMP"), np.asarray(palette.convert("RGB")))
    out["i-cmyk.tif"] = (blob := save(Image.fromarray(rgb).convert("CMYK"), "TIFF"), pillow_rgb(blob))
    out["j16.TIFF"] = (save(Image.fromarray(grey16), "TIFF"), np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    frames = [Image.fromarray(rgb).quantize(32), Image.fromarray(255 - rgb).quantize(32)]
    out["k.gif"] = (save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                    np.asarray(frames[0].convert("RGB")))  # the first frame
    if features.check("webp"):
        out["l.webp"] = (save(Image.fromarray(rgb), "WEBP", lossless=True), rgb)
    return out


@pytest.mark.parametrize("as_zip", [False, True], ids=["dir", "zip"])
def test_folder_reads_every_imagefolder_format_and_gif(tmp_path: Path, as_zip: bool) -> None:
    files = _format_files()
    src = tmp_path / ("f.zip" if as_zip else "f")
    tree = {f"train/many/{name}": blob for name, (blob, _) in files.items()}
    png = files["c.Png"][0]
    tree.update({"train/png/x.png": png, "test/many/x.png": png, "test/png/x.png": png})
    T.write_tree(tree, src, as_zip=as_zip)
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    assert ds.image_shape == (3, 10, 12) and not ds.skipped
    assert ds.y_train.tolist() == [0] * len(files) + [1]
    for i, (name, (_, expected)) in enumerate(sorted(files.items(), key=lambda kv: kv[0])):
        got = ds.x_train[i].permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), name


def test_folder_undecodable_gif_is_skipped_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "ants"
    T.write_image_folder(src, classes=("ants", "bees"))
    (src / "train" / "ants" / "imageNotFound.gif").write_bytes(b"GIF89a\x01\x00")  # truncated
    with pytest.raises(DataError, match=r"imageNotFound\.gif: not a .*GIF image; pass --skip-bad-images"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", skip_bad_images=True)
    assert len(ds.y_train) == 8 and ds.summary()["skipped_images"] == 1
