"""MNIST and Fashion-MNIST: the four IDX files, gzipped or not.

IDX layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
one big-endian uint32 per dimension and the data. The reader checks the magic, the type, and that
the data length is exactly the product of the dimensions; gzip input is decompressed in bounded
chunks so a lying header or a gzip bomb cannot make it allocate more than the file really holds.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vggkit.data.sources.base import RawData, check_labels
from vggkit.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}
_CHUNK = 1 << 24
MAX_ELEMENTS = 1 << 34
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _read_upto(stream: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes in bounded chunks (stops early at end of stream)."""
    parts: list[bytes] = []
    left = n
    while left > 0:
        block = stream.read(min(left, _CHUNK))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def read_idx_stream(raw: BinaryIO, where: str) -> np.ndarray:
    """Parse an IDX file (gzip detected by its magic) from a binary stream into a uint8 array."""
    try:
        head = raw.read(2)
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if head == b"\x1f\x8b" else raw  # type: ignore[assignment]
        header = _read_upto(stream, 4)
        if len(header) < 4:
            raise DataError(f"{where}: too short for an IDX file ({len(header)} bytes)")
        if header[:2] != b"\x00\x00":
            raise DataError(f"{where}: wrong magic number 0x{header.hex()} (not an IDX file)")
        dtype, ndim = header[2], header[3]
        if dtype != 0x08:
            kind = _TYPES.get(dtype, "unknown")
            raise DataError(f"{where}: IDX data type 0x{dtype:02x} ({kind}) is not supported; expected 0x08 (unsigned byte)")
        if not 1 <= ndim <= 4:
            raise DataError(f"{where}: IDX file claims {ndim} dimensions; expected 1 to 4")
        dims_raw = _read_upto(stream, 4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise DataError(f"{where}: truncated IDX header")
        dims = struct.unpack(f">{ndim}I", dims_raw)
        count = math.prod(dims)
        if count > MAX_ELEMENTS:
            raise DataError(f"{where}: IDX header claims an implausible shape {dims}")
        body = _read_upto(stream, count + 1)  # one extra byte detects trailing data
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: truncated or corrupt file ({exc})") from None
    if len(body) < count:
        raise DataError(f"{where}: truncated: the header promises {count:,} bytes of data for shape {dims}, found {len(body):,}")
    if len(body) > count:
        raise DataError(f"{where}: wrong length: more data than the header's shape {dims} accounts for")
    # bytearray makes the array writable, so torch.from_numpy can share it.
    return np.frombuffer(bytearray(body), dtype=np.uint8).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw)."""
    try:
        with open(path, "rb") as fh:
            return read_idx_stream(fh, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_idx_bytes(blob: bytes, where: str = "<bytes>") -> np.ndarray:
    """Read an IDX file held in memory (used by tests)."""
    return read_idx_stream(io.BytesIO(blob), where)


def find_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each as ``name.gz`` or ``name``), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, name in FILES.items():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_idx_dataset(files: dict[str, Path], classes: list[str], source: str) -> RawData:
    """Read the four files, check shapes and counts agree, return images as (N, 1, H, W)."""
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3:
            raise DataError(f"{files[f'{split}_images']}: expected a 3-D IDX image file, got shape {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{files[f'{split}_labels']}: expected a 1-D IDX label file, got shape {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{split}_labels']}: {len(labels):,} labels for {len(images):,} images in {files[f'{split}_images'].name}"
            )
        labels = check_labels(labels, len(classes), str(files[f"{split}_labels"]))
        splits[split] = (images[:, None, :, :], labels)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{source}: train images are {xtr.shape[2:]} but test images are {xte.shape[2:]}")
    return RawData(classes, xtr, ytr, xte, yte, source)
