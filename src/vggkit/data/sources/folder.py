"""Image folders: a directory or a .zip holding ``train/<class>/*`` and ``test/<class>/*``.

Also accepted: one set of class folders (the caller holds a test split out of it), ``val``/
``valid``/``validation`` in place of ``test``, and any number of single enclosing folders above
the layout (``cifar10/train/...``). Hidden files and folders, ``__MACOSX``, ``Thumbs.db`` and
``desktop.ini`` are ignored; every other file inside a class folder (at any depth) must be an
image that Pillow decodes in one of the formats of torchvision's ImageFolder (JPEG, PNG, PPM/PGM,
BMP, TIFF, WebP) or GIF (its first frame), whatever its extension's letter case, else it is an
error naming the file, or, with ``skip_bad_images``, skipped and counted. Pillow's
decompression-bomb limit stays on.

Modes: grayscale ones (1, L, LA, 16-bit) become one channel, every other (palette, RGBA, CMYK,
YCbCr, ...) RGB through Pillow's conversion; alpha is dropped, not composited; 16-bit samples are
scaled to 8 bits (v >> 8), where Pillow's own conversion would clip them at 255.

Decoding is the slow part, so the decoded uint8 arrays are cached (``.npy`` + ``meta.json``,
written to a temporary folder and renamed into place) under a key made from the source's identity
(path, size and mtime of a zip; the relative paths, sizes and mtimes of a directory's files) and
the target image size. A second load of the same source reads the arrays back in about a second.

Zip members are inflated in memory, so each one is bounded before and while it is read: at
most ``MAX_MEMBER_BYTES`` uncompressed, at most ``MAX_MEMBER_RATIO``:1 compressed when above
``RATIO_CHECK_ABOVE``, stored or deflate only, and read in chunks that stop at the limit
whatever the header claims. A member over a limit is a bad image naming the zip and member.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vggkit.data.archive import ARCHIVE_ERRORS, check_zip_member
from vggkit.data.sources.base import RawData
from vggkit.errors import DataError

log = logging.getLogger("vggkit.data")

# Pillow's names (PPM covers .pgm/.pbm too); the files' contents, not their extensions, decide.
FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")
# Formats whose 32-bit integer mode ("I") holds at most 16-bit samples (Pillow opens 16-bit PGM
# as "I", scaled to 0..65535).
SIXTEEN_BIT_I = ("PNG", "PPM")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
TEST_NAMES = ("test", "val", "valid", "validation")
MAX_COMMON_SIDE = 224  # mixed sizes without --image-size: resized to at most this side
LOG_SECONDS = 30.0  # a progress line this often when the output is not a terminal
CACHE_VERSION = 2  # 2: more formats and modes decode (a cached skip list may be stale)


def _ignored(rel: str) -> bool:
    return any(p.startswith(".") or p in IGNORED_NAMES for p in rel.split("/"))


@dataclass
class _Source:
    """A file tree (directory or zip) seen as relative posix paths."""

    root: Path
    files: list[str]  # relative paths of regular files
    dirs: set[str]  # relative paths of folders (including implied ones)
    is_zip: bool
    zf: zipfile.ZipFile | None = None  # kept open: parsing a 60k-entry directory costs ~1-2 s
    infos: dict[str, zipfile.ZipInfo] | None = None

    def display(self, rel: str) -> str:
        return f"{self.root}:{rel}" if self.is_zip else str(self.root / rel)

    def read(self, rel: str) -> bytes:
        if self.zf is not None and self.infos is not None:
            return _read_zip_member(self.zf, self.infos[rel])
        return (self.root / rel).read_bytes()

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()


def _scan_dir(root: Path) -> tuple[_Source, str]:
    files, dirs, listing = [], set(), []
    seen: set[str] = set()
    # Follow symlinked folders (class folders are often links), but never the same one twice.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        base = Path(dirpath).relative_to(root).as_posix()
        base = "" if base == "." else base + "/"
        for d in dirnames:
            dirs.add(base + d)
        for name in sorted(filenames):
            rel = base + name
            try:
                st = os.stat(Path(dirpath) / name)
            except OSError as exc:
                raise DataError(f"{Path(dirpath) / name}: cannot read ({exc.strerror})") from None
            files.append(rel)
            listing.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(listing).encode("utf-8", "surrogateescape")).hexdigest()
    return _Source(root, files, dirs, False), f"dir:{root}:{digest}"


# Zip members: a deflate bomb would otherwise take gigabytes before Pillow's pixel limit is checked.
MAX_MEMBER_BYTES = 64 << 20  # uncompressed, per image; a 24-megapixel JPEG is about 10 MiB
MAX_MEMBER_RATIO = 100  # uncompressed:compressed; deflate tops out near 1032:1
RATIO_CHECK_ABOVE = 1 << 20  # smaller members may compress any amount (a blank BMP does 100:1)
_READ_CHUNK = 1 << 20
_BOUNDED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # zipfile inflates bzip2/lzma unbounded


class ZipMemberRefused(ValueError):
    """A zip member over the size or ratio limit, or compressed with an unbounded method."""


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.4g} MiB"


def _check_zip_member_size(info: zipfile.ZipInfo) -> None:
    """Refuse a member from its header, before inflating any of it."""
    if info.compress_type not in _BOUNDED_METHODS:
        raise ZipMemberRefused(
            f"compressed with zip method {info.compress_type}, whose output vggkit cannot bound; "
            "re-zip it with deflate (zip's default)")
    if info.file_size > MAX_MEMBER_BYTES:
        raise ZipMemberRefused(
            f"refusing to inflate {_mib(info.file_size)}, over the {_mib(MAX_MEMBER_BYTES)} limit "
            "for one image")
    if info.file_size > RATIO_CHECK_ABOVE and info.file_size > MAX_MEMBER_RATIO * info.compress_size:
        raise ZipMemberRefused(
            f"refusing to inflate {info.compress_size:,} bytes into {_mib(info.file_size)} (over "
            f"{MAX_MEMBER_RATIO}:1, a decompression bomb)")


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, never more than MAX_MEMBER_BYTES whatever its header says."""
    _check_zip_member_size(info)
    chunks, total = [], 0
    with zf.open(info) as member:
        while chunk := member.read(_READ_CHUNK):
            total += len(chunk)
            if total > MAX_MEMBER_BYTES:  # the header lied about the size
                raise ZipMemberRefused(
                    f"inflates past the {_mib(MAX_MEMBER_BYTES)} limit for one image (its header "
                    f"claims {info.file_size:,} bytes)")
            chunks.append(chunk)
    return b"".join(chunks)


# A zip64 end record and its locator, which may sit between the central directory and the end record.
_ZIP64_END_BYTES = 76


def _zip_identity(path: Path) -> str:
    """The archive's size and a digest of its central directory, which lists every member's
    name, size and CRC-32: the same archive copied again or elsewhere (a new mtime, a new path)
    finds its cache, and a changed member does not. It reads the directory only (~80 bytes a
    member), not the images."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the stdlib's own reader of the end record (zip64 too)
            if end is None:
                raise zipfile.BadZipFile("no end-of-archive record")
            start = max(0, end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - _ZIP64_END_BYTES)
            f.seek(start)
            digest = hashlib.sha256(f.read()).hexdigest()
            size = f.tell()
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from None
    return f"zip:{size}:{digest}"


def _scan_zip(path: Path) -> _Source:
    """List a zip's members (checking each is safe); the returned source keeps the zip open."""
    try:
        zf = zipfile.ZipFile(path)
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from None
    try:
        files, dirs, infos = [], set(), {}
        for info in zf.infolist():
            check_zip_member(path, info)
            name = info.filename.replace("\\", "/")
            parts = name.rstrip("/").split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            if info.is_dir():
                dirs.add("/".join(parts))
            else:
                files.append(name)
                infos[name] = info
    except BaseException:
        zf.close()
        raise
    return _Source(path, files, dirs, True, zf, infos)


@dataclass
class _Layout:
    prefix: str
    train: str | None  # relative folder of the train split, None for a single set
    test: str | None
    classes: list[str]
    train_files: list[tuple[str, int]]  # (relative path, label)
    test_files: list[tuple[str, int]]


def _children(src: _Source, folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) directly inside ``folder`` ('' = root), ignoring hidden ones."""
    pre = folder + "/" if folder else ""
    subdirs = sorted({d[len(pre):].split("/")[0] for d in src.dirs if d.startswith(pre) and d != folder and not _ignored(d)})
    files = sorted(f[len(pre):] for f in src.files if f.startswith(pre) and "/" not in f[len(pre):] and not _ignored(f))
    return subdirs, files


def _class_files(src: _Source, folder: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths (recursively) for the class folders inside ``folder``."""
    subdirs, _ = _children(src, folder)
    pre = folder + "/" if folder else ""
    out: dict[str, list[str]] = {c: [] for c in subdirs}
    for f in src.files:
        if f.startswith(pre) and not _ignored(f):
            parts = f[len(pre):].split("/")
            if len(parts) >= 2 and parts[0] in out:
                out[parts[0]].append(f)
    for c in out:
        out[c].sort()
    return out


def _detect_layout(src: _Source) -> _Layout:
    prefix = ""
    # Descend through single enclosing folders (e.g. cifar10/ in cifar10-jpg.zip).
    while True:
        subdirs, files = _children(src, prefix)
        if len(subdirs) != 1 or files or subdirs[0].lower() in ("train", *TEST_NAMES):
            break
        inner = f"{prefix}/{subdirs[0]}" if prefix else subdirs[0]
        if not _children(src, inner)[0]:
            break  # a lone class folder holding images: not an enclosing folder
        prefix = inner
    subdirs, _ = _children(src, prefix)
    lower = {d.lower(): d for d in subdirs}
    join = lambda d: f"{prefix}/{d}" if prefix else d  # noqa: E731
    train = join(lower["train"]) if "train" in lower else None
    test = next((join(lower[n]) for n in TEST_NAMES if n in lower), None)
    where = src.display(prefix) if prefix else str(src.root)
    if train is None and test is not None:
        raise DataError(f"{src.display(test)}: found a test folder but no train/ folder beside it")
    sets = {"train": train if train is not None else prefix}
    if train is not None and test is not None:
        sets["test"] = test
    by_set = {name: _class_files(src, folder) for name, folder in sets.items()}
    for name, folder in sets.items():
        classes = by_set[name]
        shown = src.display(folder) if folder else str(src.root)
        if len(classes) < 2:
            raise DataError(
                f"{shown}: found {len(classes)} class folder(s); expected train/<class>/ and test/<class>/ "
                "folders, or at least two <class>/ folders of images"
            )
        for cls, files in classes.items():
            if not files:
                raise DataError(f"{src.display(f'{folder}/{cls}' if folder else cls)}: empty class folder")
    classes = list(by_set["train"])
    if "test" in by_set and set(by_set["test"]) != set(classes):
        only_train = sorted(set(classes) - set(by_set["test"]))
        only_test = sorted(set(by_set["test"]) - set(classes))
        detail = "; ".join(
            s for s in (f"only in train: {', '.join(only_train)}" if only_train else "",
                        f"only in test: {', '.join(only_test)}" if only_test else "") if s
        )
        raise DataError(f"{where}: class folders differ between {src.display(train)} and {src.display(test)} ({detail})")
    index = {c: i for i, c in enumerate(classes)}
    flat = {name: [(f, index[c]) for c, fs in by_set[name].items() for f in fs] for name in by_set}
    return _Layout(prefix, train, test, classes, flat["train"], flat.get("test", []))


class _BadImage(Exception):
    pass


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and integer/float grayscale as 8-bit L; other modes unchanged."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format in SIXTEEN_BIT_I):
        return Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return img


def _decode(blob: bytes, size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """Bytes -> (H, W) or (H, W, 3) uint8 and whether the image is grayscale."""
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as img:
            if size is not None and img.format == "JPEG":
                img.draft(img.mode, size)  # let libjpeg downscale big photos by 1/2..1/8 for free
            img = _to_8bit(img)
            gray = img.mode in ("1", "L", "LA", "La")
            want = "L" if gray else "RGB"
            if img.mode != want:
                img = img.convert(want)
            if size is not None and img.size != size:
                # Pillow's bilinear filter widens its support when shrinking, i.e. it antialiases.
                img = img.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(img), gray
    except Exception as exc:  # noqa: BLE001 - Pillow's failure modes are many (OSError, SyntaxError, ...)
        if isinstance(exc, Image.UnidentifiedImageError):
            raise _BadImage(f"not a {'/'.join(FORMATS)} image") from None
        raise _BadImage(f"corrupt image ({type(exc).__name__}: {exc})") from None


def _decode_all(
    src: _Source, files: list[str], image_size: int | None, skip_bad: bool, progress: bool
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode ``files`` into uint8 (N, C, H, W); returns (images, kept indices, [(file, reason)] bad).

    Sequential on purpose: for small images Pillow's per-file Python overhead dominates, and
    threads only contend for the GIL (measured slower than one thread on CIFAR-sized JPEGs).
    The result is cached, so this cost is paid once per source.
    """
    size: tuple[int, int] | None = (image_size, image_size) if image_size else None
    bad: list[tuple[str, str]] = []
    out: np.ndarray | None = None
    first_good = ""
    gray = np.zeros(len(files), dtype=bool)
    ok = np.zeros(len(files), dtype=bool)
    enabled = progress and sys.stderr is not None and sys.stderr.isatty()
    last_line = time.perf_counter()
    with tqdm(total=len(files), unit="img", desc=f"decoding {src.root.name}", file=sys.stderr,
              disable=not enabled, leave=False, mininterval=0.5) as bar:
        for i, rel in enumerate(files):
            if i % 512 == 0 and i:
                bar.update(512)
                # Off a terminal (nohup, CI logs) a plain line now and then instead of the bar.
                if progress and not enabled and time.perf_counter() - last_line >= LOG_SECONDS:
                    log.info("decoding %s: %d of %d images", src.root.name, i, len(files))
                    last_line = time.perf_counter()
            try:
                arr, g = _decode(_read_or_bad(src, rel), size)
            except _BadImage as exc:
                bad.append((rel, str(exc)))
                continue
            if out is None:
                # The first decodable image fixes the size when no --image-size is given.
                out = np.zeros((len(files), arr.shape[0], arr.shape[1], 3), dtype=np.uint8)
                first_good = rel
            elif arr.shape[:2] != out.shape[1:3]:
                raise _MixedSizes(
                    f"{src.display(rel)}: image is {arr.shape[1]}x{arr.shape[0]} but {src.display(first_good)} is "
                    f"{out.shape[2]}x{out.shape[1]}; pass --image-size to resize every image to one size"
                )
            out[i] = arr[:, :, None] if arr.ndim == 2 else arr
            gray[i] = g
            ok[i] = True
    if bad and not skip_bad:
        rel, reason = bad[0]
        more = f" ({len(bad)} bad files in all)" if len(bad) > 1 else ""
        raise DataError(f"{src.display(rel)}: {reason}{more}; pass --skip-bad-images to skip such files")
    if out is None:
        out = np.zeros((len(files), 1, 1, 3), dtype=np.uint8)
    keep = np.flatnonzero(ok)
    channels = 1 if len(keep) and gray[keep].all() else 3
    images = np.ascontiguousarray(out[keep][..., :channels].transpose(0, 3, 1, 2))
    return images, keep.tolist(), bad


class _MixedSizes(DataError):
    """Images of several sizes and no --image-size: the caller picks a common side."""


def common_side(src: _Source, files: list[str]) -> int:
    """The side a folder of mixed sizes is resized to: the median shorter side of its
    images (read from their headers), at most MAX_COMMON_SIDE (VGG's ImageNet size)."""
    sides = []
    for rel in files:
        try:
            with Image.open(io.BytesIO(_read_or_bad(src, rel))) as img:
                sides.append(min(img.size))
        except (_BadImage, OSError, ValueError, Image.DecompressionBombError):
            continue
    return int(min(MAX_COMMON_SIDE, max(1, np.median(sides)))) if sides else MAX_COMMON_SIDE


def _read_or_bad(src: _Source, rel: str) -> bytes:
    try:
        return src.read(rel)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error) as exc:
        raise _BadImage(f"cannot read ({exc})") from None


def _cache_key(identity: str, image_size: int | None) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "source": identity, "image_size": image_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_load(folder: Path) -> dict | None:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {k: np.load(folder / f"{k}.npy", allow_pickle=False) for k in meta["arrays"]}
        classes, skipped = meta["classes"], meta["skipped"]
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None  # a damaged cache entry is simply rebuilt
    pairs = [("x_train", "y_train")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    for xk, yk in pairs:
        x, y = arrays.get(xk), arrays.get(yk)
        if x is None or y is None or x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            return None
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            return None
    if not isinstance(classes, list) or not isinstance(skipped, list):
        return None
    meta["loaded"] = arrays
    return meta


def _cached_side(entry: Path) -> tuple[int, ...] | None:
    """(H, W) of an entry's training images, from the .npy header alone; None if unreadable."""
    try:
        return np.load(entry / "x_train.npy", mmap_mode="r").shape[2:]
    except (OSError, ValueError):
        return None


def _cache_entry(entry: Path, path: Path) -> dict | None:
    """A cache entry's meta with its arrays, or None (absent; a damaged one is removed)."""
    if not (entry / "meta.json").is_file():
        return None
    meta = _cache_load(entry)
    if meta is None:
        log.warning("the decoded-image cache %s is damaged; decoding %s again", entry, path)
        shutil.rmtree(entry, ignore_errors=True)
    return meta


def _cache_store(cache_dirs: list[Path], name: str, meta: dict, arrays: dict[str, np.ndarray]) -> Path | None:
    """Write the entry atomically in the first writable cache folder; None if none is writable."""
    for base in cache_dirs:
        try:
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
        except OSError:
            continue
        try:
            for key, arr in arrays.items():
                np.save(tmp / f"{key}.npy", arr, allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": list(arrays)}, indent=1))
            final = base / name
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / "meta.json").is_file():  # another process won the race
                    return final
                raise
            return final
        except OSError as exc:
            log.warning("could not write the decoded-image cache in %s (%s)", base, exc)
            continue
        finally:
            with contextlib.suppress(OSError):
                if tmp.exists():
                    shutil.rmtree(tmp)
    return None


def load_folder(
    path: Path,
    *,
    image_size: int | None,
    skip_bad_images: bool,
    cache_dirs: list[Path],
    progress: bool = True,
) -> RawData:
    """Decode (or fetch from the cache) an image-folder dataset."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    # A zip is identified by its stat alone, so a cache hit needs no scan of its member list.
    if path.is_dir():
        src, identity = _scan_dir(path)
    elif zipfile.is_zipfile(path):
        src, identity = None, _zip_identity(path)
    else:
        raise DataError(f"{path}: neither a folder nor a .zip archive")
    stem = f"folder-{(path.stem or 'data')[:40]}-"
    name = stem + _cache_key(identity, image_size)
    # Images decoded at their own size that are already image_size square are the same
    # arrays (no resize is done): a report at the run's size reuses training's entry.
    names = [name] + ([stem + _cache_key(identity, None)] if image_size else [])
    for base in cache_dirs:
        for entry_name in names:
            if entry_name != name and _cached_side(base / entry_name) != (image_size, image_size):
                continue  # read from the array's header: a mismatch loads nothing
            meta = _cache_entry(base / entry_name, path)
            if meta is None:
                continue
            log.info("loaded %s from the decoded-image cache %s", path, base / entry_name)
            return _from_arrays(path, meta["classes"], meta["loaded"], meta["skipped"], skip_bad_images, True)
    if src is None:
        src = _scan_zip(path)
    try:
        return _decode_and_cache(src, path, name, image_size, skip_bad_images, cache_dirs, progress)
    finally:
        src.close()


def _decode_and_cache(src: _Source, path: Path, name: str, image_size: int | None, skip_bad_images: bool,
                      cache_dirs: list[Path], progress: bool) -> RawData:
    layout = _detect_layout(src)
    files = [f for f, _ in layout.train_files] + [f for f, _ in layout.test_files]
    labels = np.array([y for _, y in layout.train_files] + [y for _, y in layout.test_files], dtype=np.int64)
    is_test = np.zeros(len(files), dtype=bool)
    is_test[len(layout.train_files):] = True
    try:
        images, keep, bad = _decode_all(src, files, image_size, skip_bad_images, progress)
    except _MixedSizes as exc:
        if image_size is not None:
            raise
        # People's folders (photos) come in every size: resize to a common square, as a
        # torchvision Resize would, and say so.
        image_size = common_side(src, files)
        log.warning("%s; resizing every image to %dx%d (the median shorter side, at most %d): "
                    "pass --image-size to choose", str(exc).split("; pass")[0], image_size,
                    image_size, MAX_COMMON_SIDE)
        images, keep, bad = _decode_all(src, files, image_size, skip_bad_images, progress)
    labels, is_test = labels[keep], is_test[keep]
    for split, mask in (("train", ~is_test), ("test", is_test)):
        if layout.test is None and split == "test":
            continue
        present = np.bincount(labels[mask], minlength=len(layout.classes))
        if (present == 0).any():
            folder = layout.train if split == "train" else layout.test
            cls = layout.classes[int(np.flatnonzero(present == 0)[0])]
            rel = f"{folder}/{cls}" if folder else cls
            raise DataError(f"{src.display(rel)}: no decodable images left in this class folder")
    arrays = {"x_train": images[~is_test], "y_train": labels[~is_test]}
    if layout.test is not None:
        arrays.update(x_test=images[is_test], y_test=labels[is_test])
    skipped = [src.display(f) + f": {reason}" for f, reason in bad]
    meta = {"version": CACHE_VERSION, "source": str(path), "classes": layout.classes, "skipped": skipped,
            "image_size": image_size}
    where = _cache_store(cache_dirs, name, meta, arrays)
    if where is not None:
        log.info("cached the decoded images of %s in %s", path, where)
    if skipped:
        log.warning("skipped %d bad image file(s) in %s", len(skipped), path)
    return _from_arrays(path, layout.classes, arrays, skipped, skip_bad_images, False)


def _from_arrays(
    path: Path, classes: list[str], arrays: dict[str, np.ndarray], skipped: list[str], skip_bad: bool, cached: bool
) -> RawData:
    if skipped and not skip_bad:
        more = f" ({len(skipped)} bad files in all)" if len(skipped) > 1 else ""
        raise DataError(f"{skipped[0]}{more}; pass --skip-bad-images to skip such files")
    return RawData(
        list(classes),
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays.get("x_test"),
        arrays["y_test"].astype(np.int64) if "y_test" in arrays else None,
        str(path),
        from_cache=cached,
        skipped=list(skipped),
    )


# Public names for code that decodes single images exactly as the folder reader does
# (e.g. prediction on image files).
BadImage = _BadImage


def decode_image(blob: bytes, size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """Decode image bytes (any of ``FORMATS``) as the folder reader does: (H, W) grey or
    (H, W, 3) RGB uint8 (read-only), and whether the image is grey; resized to ``size``
    (width, height) with Pillow's bilinear filter when given. Raises ``BadImage`` for anything
    undecodable."""
    return _decode(blob, size)
