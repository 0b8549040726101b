"""torchvision's published ImageNet VGG weights by name: ``imagenet_weights("vgg16")`` gives
the local file, found or downloaded once.

Looked up in torchvision's cache first (``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub``,
``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``), so a file a
torchvision user already has is reused; then in vggkit's own (``<user cache>/weights``). A
missing file is downloaded into vggkit's cache from ``download_url`` (``--download-url``), else
``$VGGKIT_WEIGHTS_URL``, else the official address, as ``<base>/<file name>`` (a dataset
mirror's ``{dataset}`` placeholder reads ``weights``). Every file is
checked as torch.hub checks it: its sha256 starts with the hex digits in its name
(``vgg16-397923af.pth``). ``IMAGENET_WEIGHTS`` and ``OFFICIAL_URL`` are module data that tests
replace to serve small files from a local server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from vggkit.data.download import DownloadError, fetch, file_digest
from vggkit.data.paths import user_cache_dir, writable_dir
from vggkit.errors import CheckpointError, UsageError, did_you_mean

OFFICIAL_URL = "https://download.pytorch.org/models/"
URL_ENV = "VGGKIT_WEIGHTS_URL"
PREDICT_PREFIX = "imagenet:"  # vggkit predict imagenet:vgg16 ...
# torchvision's file names: the hex digits are the start of the file's sha256.
IMAGENET_WEIGHTS: dict[str, str] = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}
# How torchvision's ImageNet weights expect their input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX
LAST_LAYER = ("classifier.6.weight", "classifier.6.bias")
VERIFIED_FILE = "verified.json"  # files already hash-checked: path -> [size, mtime_ns]


def torch_cache_dir() -> Path:
    """torchvision's weights cache, as torch.hub computes it now (the environment included)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def vggkit_cache_dir() -> Path:
    return user_cache_dir() / "weights"


def weights_file_name(model_name: str) -> str:
    """torchvision's file name of ``model_name``'s ImageNet weights; a UsageError for a model
    without any."""
    if model_name not in IMAGENET_WEIGHTS:
        raise UsageError(f"no ImageNet weights for model {model_name!r}"
                         f"{did_you_mean(model_name, IMAGENET_WEIGHTS)}; torchvision publishes "
                         f"them for {', '.join(IMAGENET_WEIGHTS)}")
    return IMAGENET_WEIGHTS[model_name]


def imagenet_weights(model_name: str, *, download: bool = True, download_url: str | None = None,
                     progress: bool = True, mirror_flag: str | None = "--download-url") -> Path:
    """The local file of torchvision's ImageNet weights for ``model_name``: found in a cache
    (and hash-checked the first time it is seen), else downloaded into vggkit's cache.
    ``mirror_flag`` is the command's flag for a mirror, named in the offline advice."""
    name = weights_file_name(model_name)
    prefix = HASH_IN_NAME.search(name).group(1)
    for folder in dict.fromkeys((torch_cache_dir(), vggkit_cache_dir())):
        path = folder / name
        if path.is_file():
            check_cached(path, prefix)
            return path
    dest = vggkit_cache_dir() / name
    base = download_url or os.environ.get(URL_ENV) or OFFICIAL_URL
    url = base.replace("{dataset}", "weights").rstrip("/") + "/" + name
    if not download:
        raise CheckpointError(f"{name} is not in a weights cache and downloads are off; "
                              f"{put_advice(mirror_flag)}")
    if not writable_dir(dest.parent):
        raise CheckpointError(f"cannot download {name}: the weights folder {dest.parent} is not "
                              f"writable; {put_advice(mirror_flag)}")
    if progress and sys.stderr is not None and sys.stderr.isatty():
        print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        fetch(url, dest, prefix, progress=progress, algorithm="sha256")
    except DownloadError as exc:
        raise CheckpointError(f"cannot download {name} from {url} ({exc.reason}); "
                              f"{put_advice(mirror_flag)}") from None
    remember_verified(dest)
    return dest


def imagenet_model_name(spec: str | Path) -> str | None:
    """MODEL of an ``imagenet:MODEL`` argument (a file of that name wins), else None."""
    text = str(spec)
    if text.startswith(PREDICT_PREFIX) and not Path(text).exists():
        return text[len(PREDICT_PREFIX):]
    return None


def put_advice(mirror_flag: str | None) -> str:
    """Where to put the file by hand, or how to name a mirror."""
    mirror = f"pass {mirror_flag} MIRROR or set ${URL_ENV}" if mirror_flag else f"set ${URL_ENV}=MIRROR"
    return (f"put that file in {torch_cache_dir()}{os.sep} (or {vggkit_cache_dir()}{os.sep}) "
            f"or {mirror}")


def check_cached(path: Path, prefix: str) -> None:
    """Refuse a cached file whose sha256 does not start with ``prefix`` (a truncated or damaged
    download); each file is hashed once, then remembered by its size and time."""
    if is_verified(path):
        return
    got = file_digest(path, "sha256")
    if not got.startswith(prefix):
        raise CheckpointError(f"{path}: its sha256 {got[:12]}... does not start with {prefix}, the "
                              "hash in its name (a truncated or damaged download); delete that "
                              "file and run again to download it anew")
    remember_verified(path)


def _verified_record() -> Path:
    return vggkit_cache_dir() / VERIFIED_FILE


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def is_verified(path: Path) -> bool:
    try:
        record = json.loads(_verified_record().read_text())
        return record.get(str(path.resolve())) == _stamp(path)
    except (OSError, ValueError, AttributeError):
        return False


def remember_verified(path: Path) -> None:
    """Best effort: an unwritable cache only means hashing the file again next time."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        record_path = _verified_record()
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        record[str(path.resolve())] = _stamp(path)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=0))
        os.replace(tmp, record_path)


def imagenet_classes() -> list[str]:
    """ImageNet's 1,000 class names in torchvision's order (0 tench ... 999 toilet tissue)."""
    text = resources.files("vggkit.models").joinpath("imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


def imagenet_mean_std(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std; one channel gets their averages."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3] * channels, [sum(IMAGENET_STD) / 3] * channels


def load_imagenet(model: nn.Module, path: Path, *, partial: bool = False) -> str:
    """Load ImageNet weights into ``model``, Keras ``include_top`` / timm
    ``reset_classifier`` style: with the ``imagenet`` head every layer but a last layer of
    another class count (which stays initialised); with other heads the convolutions.
    Returns what was loaded, for the log."""
    from vggkit.models.weights import load_matching, read_state_dict

    state = read_state_dict(path)
    own = model.state_dict()
    theirs = state.get(LAST_LAYER[0])
    reset = (getattr(model, "head", None) == "imagenet" and theirs is not None
             and LAST_LAYER[0] in own and theirs.shape != own[LAST_LAYER[0]].shape)
    if reset:
        # The model's own fresh values stand in for the last layer: it stays initialised.
        state = {**state, **{k: own[k] for k in LAST_LAYER if k in own}}
    report = load_matching(model, state, partial=partial, source=f"--init-from imagenet ({path})")
    if reset:
        report.loaded = [k for k in report.loaded if k not in LAST_LAYER]
        return (f"{path.name}: {report}; the last layer (classifier.6) re-initialised for "
                f"{own[LAST_LAYER[0]].shape[0]} classes (ImageNet's has {theirs.shape[0]})")
    return f"{path.name}: {report}"
