"""Photo folders: decoded once, in parallel, aspect ratio kept, into a memory-mapped cache.

A folder of photos comes in every size and shape. Squashing each to a square distorts it, and
decoding all of them at the crop size leaves nothing for a random resized crop to zoom into.
So each photo is decoded once, its longer side fitted to a stored side S a little larger than
the crop (``STORED_FACTOR`` x the crop; never enlarged), and written at the top-left of an
S x S uint8 canvas; its true height and width are kept beside it. The crop (random resized for
training, resize + center crop for evaluation and prediction) is taken per batch from that
canvas by ``vggkit.data.photo``.

The canvases go straight into a ``.npy`` file opened as a memory map, so decoding never holds
the dataset in memory, and training reads it back memory-mapped (``vggkit.data.store``). The
decode runs in a process pool over the cores (Pillow's decoders hold the GIL for much of the
work); small folders decode in the calling process, where starting workers would cost more.
The entry (canvases, sizes, labels, meta.json) is written to a temporary folder and renamed
into place, under a key made from the source's identity and the requested sizes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vggkit.data.sources import folder as F
from vggkit.data.sources.base import RawData
from vggkit.data.store import MappedImages
from vggkit.errors import DataError

log = logging.getLogger("vggkit.data")

STORED_FACTOR = 1.25  # stored side / crop side: room for the crop to move and zoom
PHOTO_CACHE_VERSION = 1
CHUNK = 32  # files per task of the decode pool
PARALLEL_FROM = 256  # files: fewer decode in this process


def stored_side(crop: int | None, stored_size: int | None, median_short: int, max_long: int) -> int:
    """The canvas side: ``--stored-size``, else STORED_FACTOR x the crop (the crop defaults to
    the median shorter side, at most 224), never more than the largest photo needs."""
    if stored_size:
        return int(stored_size)
    crop = crop or min(F.MAX_COMMON_SIDE, max(1, median_short))
    return max(1, min(math.ceil(crop * STORED_FACTOR), max_long))


def fit_decode(blob: bytes, side: int, channels: int | None) -> np.ndarray:
    """Image bytes -> (h, w, C) uint8 with the longer side at most ``side``, aspect kept;
    RGB unless ``channels`` is 1. Raises folder.BadImage."""
    try:
        with Image.open(io.BytesIO(blob), formats=F.FORMATS) as img:
            scale = side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            if scale < 1 and img.format == "JPEG":
                img.draft(img.mode, size)  # libjpeg's free 1/2..1/8 downscale
            img = F._to_8bit(img)
            want = "L" if channels == 1 else "RGB"
            if img.mode != want:
                img = img.convert(want)
            if max(img.size) > side:
                scale = side / max(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.Resampling.BILINEAR)  # antialiased when shrinking
            arr = np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - Pillow's failure modes are many
        if isinstance(exc, Image.UnidentifiedImageError):
            raise F.BadImage(f"not a {'/'.join(F.FORMATS)} image") from None
        raise F.BadImage(f"corrupt image ({type(exc).__name__}: {exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------- the decode pool
_WORKER: dict = {}


def _worker_source(root: str, is_zip: bool) -> F._Source:
    key = (root, is_zip)
    if _WORKER.get("key") != key:
        _WORKER["key"] = key
        _WORKER["src"] = F._scan_zip(Path(root)) if is_zip else F._Source(Path(root), [], set(), False)
    return _WORKER["src"]


def _decode_chunk(root: str, is_zip: bool, rels: list[str], side: int, channels: int | None):
    """[(array or None, reason)] for ``rels``: runs in a pool worker (or in-process)."""
    src = _worker_source(root, is_zip)
    out = []
    for rel in rels:
        try:
            out.append((fit_decode(F._read_or_bad(src, rel), side, channels), ""))
        except F.BadImage as exc:
            out.append((None, str(exc)))
    return out


def _pool(workers: int):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def decode_workers(count: int, workers: int | None = None) -> int:
    """Processes to decode ``count`` files with: the cores, or 1 for a small folder."""
    if workers is not None:
        return max(1, int(workers))
    return 1 if count < PARALLEL_FROM else max(1, min(os.cpu_count() or 1, 16))


def _decode_into(canvas: np.ndarray, sizes: np.ndarray, src: F._Source, files: list[str],
                 channels: int | None, workers: int, progress: bool) -> list[tuple[int, str]]:
    """Decode every file into its canvas row; returns [(index, reason)] of the bad ones."""
    side = canvas.shape[2]
    chunks = [list(range(lo, min(lo + CHUNK, len(files)))) for lo in range(0, len(files), CHUNK)]
    bad: list[tuple[int, str]] = []
    enabled = progress and sys.stderr is not None and sys.stderr.isatty()
    last = time.perf_counter()

    def store(rows: list[int], results) -> None:
        for i, (arr, reason) in zip(rows, results):
            if arr is None:
                bad.append((i, reason))
                continue
            h, w = arr.shape[:2]
            canvas[i, :, :h, :w] = arr.transpose(2, 0, 1)
            sizes[i] = (h, w)

    args = (str(src.root), src.is_zip)
    with tqdm(total=len(files), unit="img", desc=f"decoding {src.root.name}", file=sys.stderr,
              disable=not enabled, leave=False, mininterval=0.5) as bar, contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(_pool(workers))
            futures = [pool.submit(_decode_chunk, *args, [files[i] for i in rows], side, channels)
                       for rows in chunks]
            results = ((rows, fut.result()) for rows, fut in zip(chunks, futures))
        else:
            results = ((rows, _decode_chunk(*args, [files[i] for i in rows], side, channels))
                       for rows in chunks)
        for done, (rows, result) in enumerate(results, 1):
            store(rows, result)
            bar.update(len(rows))
            if progress and not enabled and time.perf_counter() - last >= F.LOG_SECONDS:
                log.info("decoding %s: %d of %d photos", src.root.name, done * CHUNK, len(files))
                last = time.perf_counter()
    return sorted(bad)


def _header_sides(src: F._Source, files: list[str]) -> tuple[int, int]:
    """(median shorter side, largest longer side) of the photos, from their headers."""
    short, long_ = [], []
    for rel in files:
        try:
            with Image.open(io.BytesIO(F._read_or_bad(src, rel))) as img:
                short.append(min(img.size))
                long_.append(max(img.size))
        except (F.BadImage, OSError, ValueError, Image.DecompressionBombError):
            continue
    if not short:
        return F.MAX_COMMON_SIDE, F.MAX_COMMON_SIDE
    return int(np.median(short)), int(max(long_))


# ----------------------------------------------------------------------------- the cache entry
def _entry_name(path: Path, identity: str, crop: int | None, stored: int | None, channels: int | None) -> str:
    key = F._cache_key(f"photo{PHOTO_CACHE_VERSION}:{identity}:{crop}:{stored}:{channels}", None)
    return f"photos-{(path.stem or 'data')[:40]}-{key}"


def _open_entry(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        labels = np.load(entry / "labels.npy", allow_pickle=False)
        is_test = np.load(entry / "is_test.npy", allow_pickle=False)
        keep = np.load(entry / "keep.npy", allow_pickle=False)
        images = MappedImages.open(entry / "canvas.npy", entry / "sizes.npy")
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    if not (len(labels) == len(is_test) == len(images)) or (keep.size and keep.max() >= len(labels)):
        return None
    return {"meta": meta, "labels": labels, "is_test": is_test, "keep": keep, "images": images}


def _raw(path: Path, entry: dict, has_test: bool, skip_bad: bool, cached: bool) -> RawData:
    meta, keep = entry["meta"], entry["keep"]
    skipped = meta["skipped"]
    if skipped and not skip_bad:
        more = f" ({len(skipped)} bad files in all)" if len(skipped) > 1 else ""
        raise DataError(f"{skipped[0]}{more}; pass --skip-bad-images to skip such files")
    labels, is_test, images = entry["labels"], entry["is_test"], entry["images"]
    train, test = keep[~is_test[keep]], keep[is_test[keep]]
    return RawData(list(meta["classes"]), images[train], labels[train].astype(np.int64),
                   images[test] if has_test else None,
                   labels[test].astype(np.int64) if has_test else None,
                   str(path), from_cache=cached, skipped=list(skipped))


def load_photo_folder(path: Path, *, image_size: int | None, stored_size: int | None,
                      channels: int | None, skip_bad_images: bool, cache_dirs: list[Path],
                      progress: bool = True, workers: int | None = None) -> RawData:
    """A photo folder (or .zip) as memory-mapped canvases; decoded on the first call only."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        src, identity = F._scan_dir(path)
    elif zipfile.is_zipfile(path):
        src, identity = None, F._zip_identity(path)
    else:
        raise DataError(f"{path}: neither a folder nor a .zip archive")
    name = _entry_name(path, identity, image_size, stored_size, channels)
    for base in cache_dirs:
        if (base / name / "meta.json").is_file():
            entry = _open_entry(base / name)
            if entry is not None:
                log.info("loaded %s from the decoded-photo cache %s", path, base / name)
                return _raw(path, entry, entry["meta"]["has_test"], skip_bad_images, True)
            log.warning("the decoded-photo cache %s is damaged; decoding %s again", base / name, path)
            shutil.rmtree(base / name, ignore_errors=True)
    src = src or F._scan_zip(path)
    try:
        return _decode_and_store(src, path, name, image_size, stored_size, channels,
                                 skip_bad_images, cache_dirs, progress, workers)
    finally:
        src.close()


def _decode_and_store(src, path, name, image_size, stored_size, channels, skip_bad, cache_dirs,
                      progress, workers) -> RawData:
    layout = F._detect_layout(src)
    files = [f for f, _ in layout.train_files] + [f for f, _ in layout.test_files]
    labels = np.array([y for _, y in layout.train_files] + [y for _, y in layout.test_files], np.int64)
    is_test = np.arange(len(files)) >= len(layout.train_files)
    side = stored_side(image_size, stored_size, *_header_sides(src, files))
    c = 1 if channels == 1 else 3
    base = _writable(cache_dirs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
    try:
        canvas = np.lib.format.open_memmap(tmp / "canvas.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(files), c, side, side))
        sizes = np.zeros((len(files), 2), dtype=np.int64)
        n_workers = decode_workers(len(files), workers)
        log.info("decoding %d photos of %s at a stored side of %d px with %d process(es)",
                 len(files), path, side, n_workers)
        bad = _decode_into(canvas, sizes, src, files, channels, n_workers, progress)
        canvas.flush()
        del canvas
        keep = np.setdiff1d(np.arange(len(files)), [i for i, _ in bad])
        _check_classes(src, layout, labels, is_test, keep)
        skipped = [src.display(files[i]) + f": {reason}" for i, reason in bad]
        meta = {"version": PHOTO_CACHE_VERSION, "source": str(path), "classes": layout.classes,
                "skipped": skipped, "stored_side": side, "has_test": layout.test is not None}
        for key, arr in (("sizes", sizes), ("labels", labels), ("is_test", is_test), ("keep", keep)):
            np.save(tmp / f"{key}.npy", arr, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        final = base / name
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # else another process won the race
                raise
        log.info("cached the decoded photos of %s in %s", path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = _open_entry(final)
    if entry is None:
        raise DataError(f"{final}: the decoded-photo cache just written cannot be read back")
    if skipped:
        log.warning("skipped %d bad image file(s) in %s", len(skipped), path)
    return _raw(path, entry, meta["has_test"], skip_bad, False)


def _writable(cache_dirs: list[Path]) -> Path:
    for base in cache_dirs:
        with contextlib.suppress(OSError):
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
    raise DataError(f"no writable folder for the decoded-photo cache (tried {', '.join(map(str, cache_dirs))}); "
                    "pass --data-dir a writable folder")


def _check_classes(src, layout, labels, is_test, keep) -> None:
    for split, mask in (("train", ~is_test[keep]), ("test", is_test[keep])):
        if layout.test is None and split == "test":
            continue
        present = np.bincount(labels[keep][mask], minlength=len(layout.classes))
        if (present == 0).any():
            folder = layout.train if split == "train" else layout.test
            cls = layout.classes[int(np.flatnonzero(present == 0)[0])]
            raise DataError(f"{src.display(f'{folder}/{cls}' if folder else cls)}: no decodable "
                            "images left in this class folder")


def mixed_sizes(path: Path, cache_dirs: list[Path]) -> bool:
    """True when a folder's images are not all of one size: a folder of photos. Read from the
    headers once (stopping at the first image of another size); the answer is kept in the
    cache under the source's identity, so later loads do not scan again."""
    if not path.exists() or not (path.is_dir() or zipfile.is_zipfile(path)):
        return False  # load_folder names the problem
    src, identity = F._scan_dir(path) if path.is_dir() else (None, F._zip_identity(path))
    name = f"sizes-{F._cache_key(identity, None)}.json"
    for base in cache_dirs:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return bool(json.loads((base / name).read_text())["mixed"])
    src = src or F._scan_zip(path)
    try:
        layout = F._detect_layout(src)
        first, mixed = None, False
        for rel, _ in layout.train_files + layout.test_files:
            try:
                with Image.open(io.BytesIO(F._read_or_bad(src, rel))) as img:
                    size = img.size
            except (F.BadImage, OSError, ValueError, Image.DecompressionBombError):
                continue
            first = first or size
            if size != first:
                mixed = True
                break
    finally:
        src.close()
    with contextlib.suppress(DataError, OSError):
        (_writable(cache_dirs) / name).write_text(json.dumps({"mixed": mixed}))
    return mixed
