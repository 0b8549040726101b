"""Downloading the official dataset files: md5-checked, atomic, with a progress bar.

``OFFICIAL`` is the table of files and published md5s; tests replace entries in it to serve tiny
archives from a local HTTP server. The base address comes from ``download_url`` (``--download-url``)
or ``$VGGKIT_DOWNLOAD_URL``; a ``{dataset}`` placeholder in it is replaced by the group key
(``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``), since MNIST and Fashion-MNIST share
file names. Without a placeholder the file is fetched from ``<base>/<file name>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vggkit.errors import DataError

URL_ENV = "VGGKIT_DOWNLOAD_URL"
TIMEOUT_S = 60.0  # per socket operation; a stalled server ends in an error, never a hang
CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One official file and its published md5."""

    filename: str
    md5: str


@dataclass(frozen=True)
class Official:
    """An official download group: where it comes from and which folder of the data dir it goes to."""

    key: str
    base_url: str
    folder: str  # relative to the data dir; "" = the data dir itself
    resources: tuple[Resource, ...]
    extract: str | None = None  # top folder of a tar archive to extract after download


_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

OFFICIAL: dict[str, Official] = {
    "cifar10": Official(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/",
        "",
        (Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        extract="cifar-10-batches-py",
    ),
    "cifar100": Official(
        "cifar100",
        "https://www.cs.toronto.edu/~kriz/",
        "",
        (Resource("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        extract="cifar-100-python",
    ),
    "mnist": Official(
        "mnist",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "mnist",
        tuple(Resource(f, m) for f, m in _MNIST_MD5.items()),
    ),
    "fashion-mnist": Official(
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "fashion-mnist",
        tuple(Resource(f, m) for f, m in _FASHION_MD5.items()),
    ),
}


class DownloadError(DataError):
    """A transfer that did not complete (HTTP error, no connection, cut off); ``reason`` says
    why in a few words, for callers that phrase their own advice."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    return file_digest(path, "md5")


def resource_url(group: Official, filename: str, download_url: str | None = None) -> str:
    """The address of ``filename``: the override base (flag, then env) or the official one."""
    base = download_url or os.environ.get(URL_ENV) or group.base_url
    base = base.replace("{dataset}", group.key)
    return base.rstrip("/") + "/" + filename


def _progress_enabled(progress: bool) -> bool:
    return progress and sys.stderr is not None and sys.stderr.isatty()


def fetch(url: str, dest: Path, md5: str, *, progress: bool = True, algorithm: str = "md5") -> Path:
    """Download ``url`` to ``dest`` via a temporary ``.part`` file, renamed only once its md5 (or
    ``algorithm``'s digest) matches ``md5``. A shorter expected digest is a prefix, as in torch.hub's
    weights file names (``vgg16-397923af.pth``: its sha256 starts with 397923af).

    Any failure removes the partial file and raises DataError naming the address and the file
    (DownloadError when the transfer itself failed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    part = Path(part_name)
    try:
        h = hashlib.new(algorithm, usedforsecurity=False)
        received = 0
        try:
            with contextlib.closing(os.fdopen(fd, "wb")) as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    file=sys.stderr,
                    disable=not _progress_enabled(progress),
                    leave=False,
                ) as bar:
                    while block := resp.read(CHUNK):
                        out.write(block)
                        h.update(block)
                        received += len(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} {exc.reason}"
            raise DownloadError(f"download of {url} failed: {reason}", reason) from None
        except http.client.IncompleteRead as exc:
            got_bytes = received + len(exc.partial)
            of = f" of {got_bytes + exc.expected:,}" if exc.expected is not None else ""
            raise DownloadError(
                f"download of {url} was cut off after {got_bytes:,}{of} bytes; nothing was saved as {dest}",
                f"cut off after {got_bytes:,}{of} bytes",
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DownloadError(
                f"download of {url} failed after {received:,} bytes ({reason}); nothing was saved as {dest}", str(reason)
            ) from None
        if total is not None and received != total:
            raise DownloadError(
                f"download of {url} was cut off after {received:,} of {total:,} bytes; nothing was saved as {dest}",
                f"cut off after {received:,} of {total:,} bytes",
            )
        got = h.hexdigest()
        if not md5 or not got.startswith(md5.lower()):
            expected = md5 if len(md5) == len(got) else f"one starting with {md5} (the hash in its name)"
            raise DataError(
                f"{algorithm} mismatch for {dest.name} downloaded from {url}: got {got}, expected {expected}; "
                "the file was removed"
            )
        os.replace(part, dest)
    finally:
        # On success the part file was renamed; on any failure it must not linger.
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return dest


def download_group(
    group: Official, data_dir: Path, *, download_url: str | None = None, progress: bool = True
) -> Path:
    """Download every missing file of ``group`` into its folder of ``data_dir``; return that folder."""
    folder = data_dir / group.folder if group.folder else data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {folder} ({exc.strerror}); pass --data-dir") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"the data folder {folder} is not writable; pass --data-dir")
    for res in group.resources:
        dest = folder / res.filename
        if dest.exists():
            continue
        url = resource_url(group, res.filename, download_url)
        if _progress_enabled(progress):
            print(f"downloading {url} -> {dest}", file=sys.stderr)
        fetch(url, dest, res.md5, progress=progress)
    return folder
