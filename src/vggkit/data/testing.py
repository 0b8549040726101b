"""Writers for small files in every supported dataset format, for tests and examples.

Each writer creates random but reproducible data in the exact on-disk layout the readers expect
(official layouts where there is one) and returns the arrays it wrote, so a test can read the
files back and compare exactly. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vggkit.data.sources.cifar import CIFAR10, CIFAR100
from vggkit.data.sources.idx import FILES as IDX_FILES

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- a Python 2 style pickler (protocol 2), as the official CIFAR files were written -------------

def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _py2_obj(obj: Any) -> bytes:
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return _py2_int(obj)
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin1"))
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, tuple):
        return b"(" + b"".join(_py2_obj(v) for v in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_obj(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        dtype = (b"cnumpy\ndtype\n" + _py2_str(arr.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
                 + _py2_obj((3, arr.dtype.str[0], None, None, None, -1, -1, 0)) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
                + b"(K\x01" + _py2_obj(tuple(arr.shape)) + dtype + b"\x89" + _py2_str(arr.tobytes()) + b"tb")
    raise TypeError(f"cannot write {type(obj).__name__} as a Python 2 pickle")


def py2_pickle(obj: Any) -> bytes:
    """Pickle ``obj`` (dict/list/tuple/int/str/bytes/None/bool/ndarray) the way Python 2 did."""
    return b"\x80\x02" + _py2_obj(obj) + b"."


# --- CIFAR ------------------------------------------------------------------------------------

def stripe_images(labels: np.ndarray, *, size: int = 32, channels: int = 3,
                  rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, channels, size, size): stripes 4 pixels wide, vertical for label 0 and
    horizontal for label 1, at a random phase and contrast, with noise. Crops, flips,
    cutout and resizing to a quarter of the side keep the class, and neither the brightness nor
    the colour tells it: a network that learns anything learns the orientation."""
    n = len(labels)
    phase = rng.integers(0, 8, n)[:, None, None]
    rows = np.arange(size)[None, :, None]
    cols = np.arange(size)[None, None, :]
    along = np.where(np.asarray(labels)[:, None, None] == 0, cols, rows)
    bright = ((along + phase) % 8 < 4)[:, None]  # (N, 1, size, size)
    low = rng.integers(0, 40, (n, 1, 1, 1))
    high = rng.integers(215, 256, (n, 1, 1, 1))
    noise = rng.integers(-10, 11, (n, channels, size, size))
    return np.clip(np.where(bright, high, low) + noise, 0, 255).astype(np.uint8)


def brightness_images(labels: np.ndarray, *, size: int = 32, channels: int = 3,
                      rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, channels, size, size): dark (label 0) or bright (label 1) noisy images, the
    easiest two classes there are. A plain (BatchNorm-free) VGG leaves chance on them within a
    few dozen steps, where stripes take it hundreds (docs/reliability.md)."""
    base = np.where(np.asarray(labels)[:, None, None, None] == 0,
                    rng.integers(20, 80, (len(labels), 1, 1, 1)),
                    rng.integers(175, 235, (len(labels), 1, 1, 1)))
    noise = rng.integers(-20, 21, (len(labels), channels, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def two_class_images(labels: np.ndarray, pattern: str, **kw: Any) -> np.ndarray:
    return (brightness_images if pattern == "brightness" else stripe_images)(labels, **kw)


def stripe_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Labels 0 and 1, balanced, in random order (the two classes of :func:`stripe_images`)."""
    return rng.permutation(np.arange(n) % 2).astype(np.int64)


def _rng_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _cifar_images(rng: np.random.Generator, n: int, classes: int,
                  stripes: bool | str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 rows and (N,) labels: noise with random labels, or two learnable
    classes (``stripes``: True or "stripes", or "brightness")."""
    if stripes:
        labels = stripe_labels(rng, n)
        return two_class_images(labels, stripes, rng=rng).reshape(n, -1), labels
    return _rng_images(rng, n), rng.integers(0, classes, n)


def _pack(members: dict[str, bytes], out: Path) -> None:
    with tarfile.open(out, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def cifar10_files(n_per_batch: int = 20, n_test: int = 20, seed: int = 0, stripes: bool | str = False
                  ) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Member name -> bytes of a tiny CIFAR-10 (official names, Python 2 pickles), and the
    arrays: noise with random labels, or with ``stripes`` the two-class :func:`stripe_images`."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    xs, ys = [], []
    for i, name in enumerate(CIFAR10.train):
        x, y = _cifar_images(rng, n_per_batch, 10, stripes)
        y = y.tolist()
        xs.append(x)
        ys.extend(y)
        members[f"{CIFAR10.folder}/{name}"] = py2_pickle(
            {"batch_label": f"training batch {i + 1} of 5", "labels": y, "data": x,
             "filenames": [f"img_{i}_{j}.png" for j in range(n_per_batch)]})
    xt, yt = _cifar_images(rng, n_test, 10, stripes)
    yt = yt.tolist()
    members[f"{CIFAR10.folder}/{CIFAR10.test}"] = py2_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": yt, "data": xt,
         "filenames": [f"test_{j}.png" for j in range(n_test)]})
    members[f"{CIFAR10.folder}/{CIFAR10.meta}"] = py2_pickle(
        {"num_cases_per_batch": n_per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072})
    arrays = {"x_train": np.concatenate(xs).reshape(-1, 3, 32, 32), "y_train": np.array(ys, np.int64),
              "x_test": xt.reshape(-1, 3, 32, 32), "y_test": np.array(yt, np.int64)}
    return members, arrays


def cifar100_files(n_train: int = 40, n_test: int = 20, seed: int = 0, stripes: bool | str = False
                   ) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Member name -> bytes of a tiny CIFAR-100 (fine and coarse labels), and the arrays."""
    rng = np.random.default_rng(seed)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    members: dict[str, bytes] = {}
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = _cifar_images(rng, n, 100, stripes)
        coarse = fine // 5
        members[f"{CIFAR100.folder}/{split}"] = py2_pickle(
            {"filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": f"{split} batch",
             "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "data": x})
        arrays[f"x_{split}"] = x.reshape(-1, 3, 32, 32)
        arrays[f"y_{split}"] = fine.astype(np.int64)
        arrays[f"coarse_{split}"] = coarse.astype(np.int64)
    members[f"{CIFAR100.folder}/meta"] = py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return members, arrays


def write_cifar(data_dir: Path, which: str = "cifar10", *, archive: bool = True, seed: int = 0,
                stripes: bool | str = False, **sizes: int) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10/100 into ``data_dir`` as the official .tar.gz (or extracted folder);
    ``sizes`` are the image counts of :func:`cifar10_files` or :func:`cifar100_files`."""
    files = cifar10_files if which == "cifar10" else cifar100_files
    members, arrays = files(seed=seed, stripes=stripes, **sizes)
    layout = CIFAR10 if which == "cifar10" else CIFAR100
    data_dir.mkdir(parents=True, exist_ok=True)
    if archive:
        _pack(members, data_dir / layout.archive)
    else:
        for name, blob in members.items():
            (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / name).write_bytes(blob)
    return arrays


def cifar_archive_bytes(which: str = "cifar10", seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """The .tar.gz bytes of a tiny CIFAR (for a download test server), and its arrays."""
    members, arrays = cifar10_files(seed=seed) if which == "cifar10" else cifar100_files(seed=seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue(), arrays


# --- IDX (MNIST / Fashion-MNIST) ---------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of a uint8 array."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_files(n_train: int = 60, n_test: int = 20, size: int = 28, seed: int = 0,
                gz: bool = True, stripes: bool | str = False
                ) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """File name -> bytes of the four IDX files (gzipped by default), and the arrays: noise
    with random labels, or with ``stripes`` the two-class :func:`stripe_images`."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if stripes:
            labels = stripe_labels(rng, n)
            images = two_class_images(labels, stripes, size=size, channels=1, rng=rng)[:, 0]
        else:
            images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
            labels = rng.integers(0, 10, n).astype(np.int64)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    files = {}
    for key, name in (("x_train", IDX_FILES["train_images"]), ("y_train", IDX_FILES["train_labels"]),
                      ("x_test", IDX_FILES["test_images"]), ("y_test", IDX_FILES["test_labels"])):
        blob = idx_bytes(arrays[key].astype(np.uint8))
        files[name + ".gz" if gz else name] = gzip.compress(blob, mtime=0) if gz else blob
    return files, {k: (v[:, None] if k.startswith("x") else v) for k, v in arrays.items()}


def write_mnist(folder: Path, *, gz: bool = True, seed: int = 0, **kw: Any) -> dict[str, np.ndarray]:
    """Write the four IDX files into ``folder``; returns the arrays as (N, 1, H, W) / (N,)."""
    files, arrays = mnist_files(seed=seed, gz=gz, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return arrays


# --- npz and image folders -----------------------------------------------------------------------

def write_npz(path: Path, *, n_train: int = 30, n_test: int = 10, shape: tuple[int, ...] = (28, 28),
              seed: int = 0, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A Keras-style npz (images (N, H, W) or (N, H, W, C) uint8, labels (N,))."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def write_image_folder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 4,
                       test_per_class: int | None = 2, size: tuple[int, int] = (12, 10), fmt: str = "PNG",
                       mode: str = "RGB", as_zip: bool = False, top: str | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Class folders of images (``train/``+``test/``, or one set if ``test_per_class`` is None).

    PNG/BMP are lossless, so the returned arrays (in reading order: sorted class, then file name)
    are exactly what a reader must produce. ``size`` is (width, height).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
    sets = {"train": per_class, "test": test_per_class} if test_per_class is not None else {"": per_class}
    files: dict[str, bytes] = {}
    arrays: dict[str, Any] = {"classes": sorted(classes)}
    for split, n in sets.items():
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            for j in range(n):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels, mode).save(buf, format=fmt)
                rel = "/".join(p for p in (top, split, cls, f"{j:04d}.{ext}") if p)
                files[rel] = buf.getvalue()
                xs.append(pixels[None] if mode == "L" else pixels.transpose(2, 0, 1))
                ys.append(label)
        arrays[f"x_{split or 'all'}"] = np.stack(xs)
        arrays[f"y_{split or 'all'}"] = np.array(ys, np.int64)
    write_tree(files, root, as_zip=as_zip)
    arrays["files"] = sorted(files)
    return arrays


def write_tree(files: dict[str, bytes], root: Path, *, as_zip: bool = False) -> None:
    """Files by relative path, into folder ``root`` or into the zip file ``root``."""
    if as_zip:
        root.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root, "w") as zf:
            for rel, blob in files.items():
                zf.writestr(rel, blob)
        return
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)


# --- a dataset whose class is where a bright square is -------------------------------------------

CORNER_CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def corner_images(labels: np.ndarray, *, size: int = 32, square: int = 8,
                  seed: int = 0) -> np.ndarray:
    """uint8 (N, size, size, 3) dim noise with a bright square in corner ``labels[i]``
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right): a task a network can only
    solve by looking at the right place, for tests of Grad-CAM."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 100, (len(labels), size, size, 3), dtype=np.uint8)
    for image, label in zip(images, labels):
        top = 1 if label < 2 else size - square - 1
        left = 1 if label % 2 == 0 else size - square - 1
        image[top:top + square, left:left + square] = rng.integers(200, 256, 3, dtype=np.uint8)
    return images


def write_corners_npz(path: Path, *, n_train: int = 400, n_test: int = 40, size: int = 32,
                      mislabelled: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """An npz of :func:`corner_images` with 4 classes (balanced, labels cycling). The first
    ``mislabelled`` test images are labelled with the next corner than the one they show, so
    that a model that learned the task gets exactly those wrong. Also returns ``corner_test``,
    the corner each test image shows."""
    y_train = (np.arange(n_train) % 4).astype(np.int64)
    corner_test = (np.arange(n_test) % 4).astype(np.int64)
    y_test = corner_test.copy()
    y_test[:mislabelled] = (y_test[:mislabelled] + 1) % 4
    arrays = {"x_train": corner_images(y_train, size=size, seed=seed),
              "y_train": y_train,
              "x_test": corner_images(corner_test, size=size, seed=seed + 1),
              "y_test": y_test,
              "classes": np.array(CORNER_CLASSES)}
    np.savez(path, **arrays)
    return {**arrays, "corner_test": corner_test}


def write_photo_folder(root: Path, *, per_class: int = 12, test_per_class: int = 4,
                       sides: tuple[int, int] = (24, 72), fmt: str = "PNG", seed: int = 0) -> dict[str, Any]:
    """``train/`` + ``test/`` folders of two classes of photos of many sizes and shapes
    (width and height each uniform in ``sides``): "red" ones are reddish, "blue" ones bluish,
    with noise, so a network learns them from any crop. Returns each file's (height, width)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes: dict[str, tuple[int, int]] = {}
    files: dict[str, bytes] = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        for label, cls in enumerate(("blue", "red")):
            for j in range(n):
                w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                pixels[..., 2 - 2 * label] += 150  # blue or red channel raised
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format=fmt)
                rel = f"{split}/{cls}/{j:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
                files[rel] = buf.getvalue()
                sizes[rel] = (h, w)
    write_tree(files, root)
    return sizes
