"""Keras-style ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (+ optional ``classes``).

Read member by member with ``zipfile`` and ``numpy.lib.format`` rather than ``np.load`` so every
array's header is checked against the bytes really present before anything is allocated (a
corrupt header cannot request terabytes), and object arrays (pickles) are refused outright.

Images may be (N, H, W), (N, H, W, C) as Keras stores them, or (N, C, H, W) with C in 1/3; uint8,
or floats in [0, 1] (scaled to 0..255). Labels may be (N,) or (N, 1) integers.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from vggkit.data.archive import ARCHIVE_ERRORS, check_zip_member
from vggkit.data.sources.base import RawData, check_labels
from vggkit.data.sources.idx import _read_upto
from vggkit.errors import DataError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    label = f"{where}: array {key!r}"
    with zf.open(info) as fh:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh, max_header_size=10000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npformat.read_array_header_2_0(fh, max_header_size=10000)
        else:
            raise DataError(f"{label}: unsupported .npy format version {version}")
        if dtype.hasobject:
            raise DataError(f"{label}: object arrays are not allowed (they would need pickle)")
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        have = info.file_size - fh.tell()
        if need != have:
            raise DataError(f"{label}: header promises {need:,} bytes for shape {shape} of {dtype}, member holds {have:,}")
        blob = _read_upto(fh, need)
        if len(blob) < need:
            raise DataError(f"{label}: truncated")
    arr = np.frombuffer(bytearray(blob), dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def read_npz(path: Path, where: str | None = None, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Every array in the archive (``data`` bytes instead of the file, for tests)."""
    where = where or str(path)
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as zf:
            out = {}
            for info in zf.infolist():
                check_zip_member(Path(where), info)
                if info.is_dir():
                    continue
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                out[key] = _read_member(zf, info, where)
            return out
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    except (*ARCHIVE_ERRORS, KeyError, TypeError, SyntaxError, OverflowError, MemoryError) as exc:
        # numpy's header parser raises ValueError/SyntaxError on garbage; zipfile raises a handful.
        raise DataError(f"{where}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """Keras/torch image arrays -> uint8 (N, C, H, W)."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise DataError(f"{where}: images of shape {x.shape} have neither 1 nor 3 channels")
    else:
        raise DataError(f"{where}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
            raise DataError(f"{where}: float images must lie in [0, 1]")
        return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8))
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{where}: integer images must lie in 0..255")
        return np.ascontiguousarray(x.astype(np.uint8))
    raise DataError(f"{where}: images have unsupported dtype {x.dtype}")


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be (N,) or (N, 1) integers, got {y.dtype} of shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y):,} labels for {n:,} images")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}")
    return y.astype(np.int64)


def load_npz(path: Path, data: bytes | None = None) -> RawData:
    """Read a Keras-style npz into RawData; class names from a ``classes`` array if present.

    ``data``: the file's bytes, read instead of ``path`` (tests).
    """
    arrays = read_npz(path, data=data)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'none'})")
    x_train = _images(arrays["x_train"], f"{path}: x_train")
    x_test = _images(arrays["x_test"], f"{path}: x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}")
    y_train = _labels(arrays["y_train"], len(x_train), f"{path}: y_train")
    y_test = _labels(arrays["y_test"], len(x_test), f"{path}: y_test")
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: 'classes' must be a 1-D array of strings")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    else:
        top = max(int(y_train.max(initial=-1)), int(y_test.max(initial=-1)))
        classes = [str(i) for i in range(top + 1)]
    y_train = check_labels(y_train, len(classes), f"{path}: y_train")
    y_test = check_labels(y_test, len(classes), f"{path}: y_test")
    return RawData(classes, x_train, y_train, x_test, y_test, str(path))
