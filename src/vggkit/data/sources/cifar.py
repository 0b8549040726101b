"""CIFAR-10 / CIFAR-100, the official "python version": an extracted folder or the .tar.gz itself.

Each batch file is a pickled dict with ``data`` (uint8, N x 3072, R then G then B planes of
32x32) and ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100); the meta file
names the classes. Pickles are read with ``safepickle.restricted_loads``, never plain pickle.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vggkit.data.archive import ARCHIVE_ERRORS, check_tar_member, open_tar
from vggkit.data.safepickle import restricted_loads
from vggkit.data.sources.base import RawData, check_labels
from vggkit.errors import DataError

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """File names of one CIFAR variant."""

    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


CIFAR10 = CifarLayout(
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    "labels",
    "label_names",
)
CIFAR100 = CifarLayout(
    "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"
)
CIFAR100_COARSE = CifarLayout(
    "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta", "coarse_labels", "coarse_label_names"
)


def _load_pickle(blob: bytes, where: str) -> dict[str, Any]:
    try:
        obj = restricted_loads(blob)
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile/corrupt stream is a data error
        raise DataError(f"{where}: not a readable CIFAR batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    # Python 2 pickles read as latin1 give str keys; a file written with bytes keys is accepted too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def parse_batch(blob: bytes, where: str, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One batch file's bytes -> (uint8 images (N, 3, 32, 32), int64 labels (N,)); DataError if malformed."""
    batch = _load_pickle(blob, where)
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise DataError(f"{where}: batch file is missing key(s) {', '.join(repr(k) for k in missing)}")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, {_PIXELS}), found {desc}")
    if isinstance(labels, np.ndarray):
        labels_arr = labels
    elif isinstance(labels, (list, tuple)) and all(type(v) is int for v in labels):
        labels_arr = np.array(labels, dtype=np.int64)
    else:
        raise DataError(f"{where}: {label_key!r} must be a list of integers")
    if labels_arr.ndim != 1 or len(labels_arr) != len(data):
        raise DataError(f"{where}: {len(labels_arr)} labels for {len(data)} images")
    if labels_arr.dtype.kind not in "iu":
        raise DataError(f"{where}: {label_key!r} must be integers, found {labels_arr.dtype}")
    return data.reshape(-1, 3, 32, 32), labels_arr.astype(np.int64)


def parse_meta(blob: bytes, where: str, names_key: str) -> list[str]:
    """Class names from a meta file."""
    meta = _load_pickle(blob, where)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{where}: meta file is missing the list {names_key!r}")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _read_folder(folder: Path, layout: CifarLayout) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        path = folder / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: missing (expected in the extracted {layout.folder}/ folder)") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None

    return read


def _read_archive(path: Path, layout: CifarLayout) -> dict[str, bytes]:
    """Read the needed members in one streaming pass (no seeking back through the gzip stream)."""
    wanted = {f"{layout.folder}/{n}" for n in (*layout.train, layout.test, layout.meta)}
    found: dict[str, bytes] = {}
    tar = open_tar(path)
    try:
        with tar:
            for member in tar:
                check_tar_member(path, member)
                if member.name in wanted:
                    if not member.isfile():
                        raise DataError(f"{path}: archive member {member.name!r} is not a regular file")
                    fh = tar.extractfile(member)
                    assert fh is not None
                    found[member.name] = fh.read()
    except DataError:
        raise
    except (*ARCHIVE_ERRORS, tarfile.TarError) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and download it again") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}")
    return {name.rsplit("/", 1)[1]: blob for name, blob in found.items()}


def folder_complete(folder: Path, layout: CifarLayout) -> bool:
    """True if ``folder`` holds every file of the layout."""
    return all((folder / n).is_file() for n in (*layout.train, layout.test, layout.meta))


def load_cifar(location: Path, layout: CifarLayout) -> RawData:
    """Read an extracted folder or the .tar.gz at ``location``."""
    if location.is_dir():
        read = _read_folder(location, layout)
        where = lambda name: str(location / name)  # noqa: E731
    else:
        blobs = _read_archive(location, layout)
        read = blobs.__getitem__
        where = lambda name: f"{location}:{layout.folder}/{name}"  # noqa: E731
    classes = parse_meta(read(layout.meta), where(layout.meta), layout.names_key)
    xs, ys = [], []
    for name in layout.train:
        x, y = parse_batch(read(name), where(name), layout.label_key)
        xs.append(x)
        ys.append(check_labels(y, len(classes), where(name)))
    x_test, y_test = parse_batch(read(layout.test), where(layout.test), layout.label_key)
    y_test = check_labels(y_test, len(classes), where(layout.test))
    return RawData(classes, np.concatenate(xs), np.concatenate(ys), x_test.copy(), y_test, str(location))
