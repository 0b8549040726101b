"""Datasets by name: locate (or download), read, prepare, and describe them."""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggkit.data import download as dl
from vggkit.data.archive import extract_tar
from vggkit.data.paths import cache_dirs, resolve_data_dir
from vggkit.data.prepare import channel_stats, convert_channels, resize
from vggkit.data.sources import cifar, idx
from vggkit.data.sources.base import RawData
from vggkit.data.split import balanced_subset, stratified_split
from vggkit.data.store import MappedImages, region_stats
from vggkit.errors import DataError, UsageError, unknown_name

log = logging.getLogger("vggkit.data")

DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "cifar100-coarse", "mnist", "fashion-mnist", "digits")
PATH_KINDS: tuple[str, ...] = ("folder", "npz")
SINGLE_SET_TEST_FRACTION = 0.2  # test share held out (first) of a folder or npz without a test set
SINGLE_SET_SEED = 0  # fixed: the test set of a folder must not move with the training seed
# The validation split held out of the training images when --val-split is not given:
# 5,000 images for the official 50,000/60,000-image sets (as Keras and airbench users hold
# out), 10% for the small and user-made ones.
DEFAULT_VAL_IMAGES = {"cifar10": 5000, "cifar100": 5000, "cifar100-coarse": 5000, "mnist": 5000,
                      "fashion-mnist": 5000}
DEFAULT_VAL_FRACTION = 0.1
MAX_IMAGE_SIZE = 1024
PHOTO_STATS_SAMPLE = 2000  # photos the mean/std of a photo folder are measured on

_DESCRIPTIONS = {
    "cifar10": "CIFAR-10: 50,000/10,000 32x32 RGB images, 10 classes",
    "cifar100": "CIFAR-100: 50,000/10,000 32x32 RGB images, 100 fine classes",
    "cifar100-coarse": "CIFAR-100 with its 20 coarse superclasses as labels",
    "mnist": "MNIST: 60,000/10,000 28x28 grayscale digits",
    "fashion-mnist": "Fashion-MNIST: 60,000/10,000 28x28 grayscale clothing images, 10 classes",
    "digits": "scikit-learn's 8x8 digits: 1,797 images, fixed 80/20 split (offline default)",
    "folder": ("a directory or .zip of train/<class>/ and test/<class>/ images "
               "(JPEG/PNG/PPM/PGM/BMP/TIFF/WebP, GIF's first frame; any letter case)"),
    "npz": "a Keras-style .npz with x_train, y_train, x_test, y_test",
}
_CIFAR_LAYOUTS = {"cifar10": cifar.CIFAR10, "cifar100": cifar.CIFAR100, "cifar100-coarse": cifar.CIFAR100_COARSE}
_IDX = {
    "mnist": ("mnist", "MNIST", idx.MNIST_CLASSES),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST", idx.FASHION_CLASSES),
}
_GROUP = {"cifar10": "cifar10", "cifar100": "cifar100", "cifar100-coarse": "cifar100", "mnist": "mnist",
          "fashion-mnist": "fashion-mnist"}


@dataclass(repr=False)
class Dataset:
    """A prepared dataset: uint8 (N, C, H, W) images and int64 labels per split, plus metadata.

    Normalisation is not applied to the stored data; ``mean``/``std`` (per channel, [0, 1] units,
    computed on ``x_train``) are for the Loader to apply per batch.
    """

    name: str
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = ""
    from_cache: bool = False  # folder datasets: decoded images came from the cache
    skipped: list[str] = field(default_factory=list)  # bad image files skipped (skip_bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description for run folders and reports."""
        return {
            "name": self.name,
            "source": self.source,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "train": int(len(self.y_train)),
            "val": int(len(self.y_val)) if self.y_val is not None else 0,
            "test": int(len(self.y_test)),
            "mean": list(self.mean),
            "std": list(self.std),
            "from_cache": self.from_cache,
            "skipped_images": len(self.skipped),
        }

    def __repr__(self) -> str:
        val = f", val={len(self.y_val)}" if self.y_val is not None else ""
        return (f"Dataset({self.name!r}, classes={self.num_classes}, shape={self.image_shape}, "
                f"train={len(self.y_train)}{val}, test={len(self.y_test)})")


def _canonical(name: str) -> tuple[str, str | None]:
    """('cifar10', None) for a dataset name, ('folder', 'PATH') for a path kind; UsageError if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("--dataset: empty dataset name")
    head, sep, rest = name.partition(":")
    if sep and head.strip().lower() in PATH_KINDS:
        if not rest.strip():
            raise UsageError(f"--dataset {name}: give a path after the colon, e.g. {head}:path/to/data")
        return head.strip().lower(), rest
    squash = lambda s: s.lower().replace("-", "").replace("_", "")  # noqa: E731
    for known in DATASET_NAMES:
        if squash(name.strip()) == squash(known):
            return known, None
    raise unknown_name("dataset", name, [*DATASET_NAMES, "folder:PATH", "npz:PATH"])


def _official_candidates(name: str, data_dir: Path) -> list[Path]:
    """Where an official dataset is looked for, preferred first."""
    if name in _CIFAR_LAYOUTS:
        layout = _CIFAR_LAYOUTS[name]
        return [data_dir / layout.folder, data_dir / layout.archive]
    folder, tv_folder, _ = _IDX[name]
    return [data_dir / folder, data_dir / tv_folder / "raw"]


def _find_official(name: str, data_dir: Path) -> Path | None:
    """The first candidate location that holds a complete copy, or None."""
    for cand in _official_candidates(name, data_dir):
        if name in _CIFAR_LAYOUTS:
            layout = _CIFAR_LAYOUTS[name]
            if cand.is_dir() and cifar.folder_complete(cand, layout):
                return cand
            if cand.is_file():
                return cand
        elif cand.is_dir() and idx.find_files(cand) is not None:
            return cand
    return None


def _placement_hint(name: str, data_dir: Path) -> str:
    """Which files to put where, for the offline message."""
    if name in _CIFAR_LAYOUTS:
        layout = _CIFAR_LAYOUTS[name]
        return f"place {layout.archive} (or its extracted folder {layout.folder}/) in {data_dir}"
    folder = data_dir / _IDX[name][0]
    names = [f"{n}.gz" for n in idx.FILES.values()]
    missing = [n for n in names if not (folder / n).exists() and not (folder / n[:-3]).exists()]
    have = f" ({len(names) - len(missing)} of 4 present; missing {', '.join(missing)})" if 0 < len(missing) < 4 else ""
    return f"place {', '.join(names)} in {folder}{have} (torchvision's {data_dir / _IDX[name][1] / 'raw'} also works)"


def _obtain_official(name: str, data_dir: Path, download: bool, download_url: str | None, progress: bool) -> Path:
    found = _find_official(name, data_dir)
    if found is not None:
        return found
    group = dl.OFFICIAL[_GROUP[name]]
    hint = _placement_hint(name, data_dir)
    if not download:
        raise DataError(f"{name} not found: {hint}, or drop --no-download to fetch it from {dl.resource_url(group, '', download_url)}")
    try:
        folder = dl.download_group(group, data_dir, download_url=download_url, progress=progress)
    except DataError as exc:
        raise DataError(f"{exc}; to work offline, {hint}") from None
    if group.extract:
        return extract_tar(folder / group.resources[0].filename, data_dir, group.extract)
    return folder


def _resolve_user_path(arg: str, data_dir: Path) -> Path:
    """A user path: as given (relative to the working directory), else relative to the data dir."""
    path = Path(arg).expanduser()
    if not path.exists() and not path.is_absolute() and (data_dir / path).exists():
        path = data_dir / path
    return path.resolve()


def _read(kind: str, arg: str | None, data_dir: Path, *, download: bool, download_url: str | None,
          image_size: int | None, skip_bad_images: bool, progress: bool, photos: bool | None = None,
          stored_size: int | None = None, channels: int | None = None) -> tuple[str, RawData]:
    if kind == "digits":
        from vggkit.data.sources.digits import load_digits_data

        return "digits", load_digits_data()
    if kind == "npz":
        from vggkit.data.sources.npz import load_npz

        path = _resolve_user_path(arg or "", data_dir)
        if not path.is_file():
            raise DataError(f"{path}: npz file not found (from --dataset npz:{arg})")
        return f"npz:{path}", load_npz(path)
    if kind == "folder":
        from vggkit.data.sources import photos as ph
        from vggkit.data.sources.folder import load_folder

        path = _resolve_user_path(arg or "", data_dir)
        if photos or (photos is None and ph.mixed_sizes(path, cache_dirs(data_dir))):
            raw = ph.load_photo_folder(path, image_size=image_size, stored_size=stored_size,
                                       channels=channels, skip_bad_images=skip_bad_images,
                                       cache_dirs=cache_dirs(data_dir), progress=progress)
            return f"folder:{path}", raw
        raw = load_folder(path, image_size=image_size, skip_bad_images=skip_bad_images,
                          cache_dirs=cache_dirs(data_dir), progress=progress)
        return f"folder:{path}", raw
    location = _obtain_official(kind, data_dir, download, download_url, progress)
    if kind in _CIFAR_LAYOUTS:
        return kind, cifar.load_cifar(location, _CIFAR_LAYOUTS[kind])
    files = idx.find_files(location)
    if files is None:  # pragma: no cover - _obtain_official guarantees them
        raise DataError(f"{location}: the four IDX files are not all present")
    return kind, idx.load_idx_dataset(files, _IDX[kind][2], str(location))


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_options(image_size: int | None, channels: int | None, subset: int | None,
                   val_split: float | None) -> None:
    if image_size is not None and (not _is_int(image_size) or not 1 <= image_size <= MAX_IMAGE_SIZE):
        raise UsageError(f"--image-size {image_size}: expected an integer from 1 to {MAX_IMAGE_SIZE}")
    if channels is not None and (not _is_int(channels) or channels not in (1, 3)):
        raise UsageError(f"--channels {channels}: expected 1 or 3")
    if subset is not None and (not _is_int(subset) or subset < 1):
        raise UsageError(f"--subset {subset}: expected a positive number of training images")
    if val_split is not None and not valid_val_split(val_split):
        raise UsageError(f"--val-split {val_split}: expected a fraction in [0, 1) or a whole "
                         "number of images")


def valid_val_split(value: object) -> bool:
    """A fraction in [0, 1), or a whole number of images >= 1."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    v = float(value)
    return 0.0 <= v < 1.0 or (v >= 1.0 and v.is_integer())


def val_count(val_split: float | None, kind: str, n_train: int) -> int:
    """How many of ``n_train`` images the validation split holds: the dataset's default
    for None, a share for a fraction, else the number itself."""
    if val_split is None:
        if kind in DEFAULT_VAL_IMAGES and n_train > 2 * DEFAULT_VAL_IMAGES[kind]:
            return DEFAULT_VAL_IMAGES[kind]
        val_split = DEFAULT_VAL_FRACTION
    if val_split < 1.0:
        return int(round(n_train * val_split)) if val_split > 0 else 0
    return int(val_split)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    download_url: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    subset: int | None = None,
    val_split: float | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
    progress: bool = True,
    photos: bool | None = None,
    stored_size: int | None = None,
) -> Dataset:
    """Load dataset ``name`` and prepare it.

    Order: read (or download); a folder or npz without a test set gives up a fixed test
    split first (20%, stratified, seed 0, whatever the training seed); hold out the
    validation split of the remaining training images (stratified, ``seed``): ``val_split``
    as a fraction or a number of images, 0 for none, None for the dataset's default
    (:func:`val_count`); keep a class-balanced ``subset`` of what is left (``seed``);
    convert channels; resize; compute mean/std on the final train images. The three
    parts never share an image.

    A folder of photos (images of several sizes, or ``photos=True``) is kept on disk: its
    splits are ``MappedImages`` of canvases holding each photo at its own aspect ratio (longer
    side ``stored_size``, by default 1.25 x ``image_size``), already in the requested channels;
    the crop to ``image_size`` happens per batch (``vggkit.data.photo``). Its mean/std come
    from up to ``PHOTO_STATS_SAMPLE`` training photos.
    """
    _check_options(image_size, channels, subset, val_split)
    image_size = int(image_size) if image_size is not None else None
    channels = int(channels) if channels is not None else None
    subset = int(subset) if subset is not None else None
    val_split = float(val_split) if val_split is not None else None
    kind, arg = _canonical(name)
    root = resolve_data_dir(data_dir)
    if photos and kind != "folder":
        raise UsageError(f"--random-resized-crop/--stored-size: only for folder datasets of photos, not {name}")
    full_name, raw = _read(kind, arg, root, download=download, download_url=download_url,
                           image_size=image_size, skip_bad_images=skip_bad_images, progress=progress,
                           photos=photos, stored_size=stored_size, channels=channels)
    x_tr, y_tr = raw.x_train, raw.y_train
    if raw.x_test is None or raw.y_test is None:
        keep, held = stratified_split(y_tr, SINGLE_SET_TEST_FRACTION, SINGLE_SET_SEED)
        x_te, y_te = x_tr[held], y_tr[held]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    else:
        x_te, y_te = raw.x_test, raw.y_test
    x_val = y_val = None
    n_val = val_count(val_split, kind, len(y_tr))
    if n_val >= len(y_tr):
        shown = "(default)" if val_split is None else f"{val_split:g}"
        raise UsageError(f"--val-split {shown}: holds out {n_val:,} of the {len(y_tr):,} "
                         f"training images of {full_name}, leaving none to train on")
    if n_val > 0:
        keep, held = stratified_split(y_tr, n_val / len(y_tr), seed)
        x_val, y_val = x_tr[held], y_tr[held]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if subset is not None:
        if subset > len(y_tr):
            raise UsageError(f"--subset {subset}: {full_name} has only {len(y_tr):,} training images"
                             + (" after --val-split" if x_val is not None else ""))
        pick = balanced_subset(y_tr, subset, seed)
        x_tr, y_tr = x_tr[pick], y_tr[pick]

    if isinstance(x_tr, MappedImages):
        return _photo_dataset(full_name, raw, x_tr, y_tr, x_te, y_te, x_val, y_val, seed)

    def prep(x: np.ndarray) -> torch.Tensor:
        t = _tensor(x)
        # Fewer channels first and more channels last keeps the resize on the smaller array.
        if channels == 1:
            t = convert_channels(t, 1)
        if image_size is not None:
            t = resize(t, image_size)
        if channels == 3:
            t = convert_channels(t, 3)
        return t.contiguous()

    xt = prep(x_tr)
    mean, std = channel_stats(xt)
    return Dataset(
        name=full_name,
        classes=list(raw.classes),
        x_train=xt,
        y_train=_tensor(y_tr.astype(np.int64)),
        x_test=prep(x_te),
        y_test=_tensor(y_te.astype(np.int64)),
        x_val=prep(x_val) if x_val is not None else None,
        y_val=_tensor(y_val.astype(np.int64)) if y_val is not None else None,
        mean=mean,
        std=std,
        source=raw.source,
        from_cache=raw.from_cache,
        skipped=list(raw.skipped),
    )


def _photo_dataset(name: str, raw: RawData, x_tr, y_tr, x_te, y_te, x_val, y_val, seed: int) -> Dataset:
    mean, std = region_stats(x_tr, x_tr.sample_positions(PHOTO_STATS_SAMPLE, seed))
    labels = lambda y: _tensor(y.astype(np.int64)) if y is not None else None  # noqa: E731
    return Dataset(name=name, classes=list(raw.classes), x_train=x_tr, y_train=labels(y_tr),
                   x_test=x_te, y_test=labels(y_te), x_val=x_val, y_val=labels(y_val),
                   mean=mean, std=std, source=raw.source, from_cache=raw.from_cache,
                   skipped=list(raw.skipped))


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every dataset: where it is looked for and whether it is present (no reading, no download).

    Keys: name, location (where found, else where it would go), present, description, kind
    ('official' | 'bundled' | 'path'), looked_in (all candidate paths), url (official download).
    """
    root = resolve_data_dir(data_dir)
    out: list[dict[str, Any]] = []
    for name in DATASET_NAMES:
        if name == "digits":
            out.append({"name": name, "location": "bundled with scikit-learn", "present": True,
                        "description": _DESCRIPTIONS[name], "kind": "bundled", "looked_in": [], "url": None})
            continue
        cands = _official_candidates(name, root)
        found = _find_official(name, root)
        group = dl.OFFICIAL[_GROUP[name]]
        out.append({
            "name": name,
            "location": str(found or (cands[1] if name in _CIFAR_LAYOUTS else cands[0])),
            "present": found is not None,
            "description": _DESCRIPTIONS[name],
            "kind": "official",
            "looked_in": [str(c) for c in cands],
            "url": dl.resource_url(group, group.resources[0].filename),
        })
    for kind in PATH_KINDS:
        out.append({"name": f"{kind}:PATH", "location": "PATH (given after the colon)", "present": False,
                    "description": _DESCRIPTIONS[kind], "kind": "path", "looked_in": [], "url": None})
    return out
