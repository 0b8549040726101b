"""Downloads against a local HTTP server on 127.0.0.1 serving tiny generated archives."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vggkit.data import download as dl
from vggkit.data import load_dataset as _load_dataset

# The downloads are compared with the files served: no validation split.
load_dataset = functools.partial(_load_dataset, val_split=0)
from vggkit.data import testing as T
from vggkit.errors import DataError
from local_server import LocalServer as _Server


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as s:
        yield s


@pytest.fixture(autouse=True)
def _quick_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "TIMEOUT_S", 10.0)
    monkeypatch.delenv(dl.URL_ENV, raising=False)


def _serve_cifar(server: _Server, monkeypatch: pytest.MonkeyPatch, md5: str | None = None) -> dict[str, np.ndarray]:
    blob, arrays = T.cifar_archive_bytes()
    server.files["/cifar-10-python.tar.gz"] = blob
    group = dl.OFFICIAL["cifar10"]
    res = dl.Resource("cifar-10-python.tar.gz", md5 or hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(dl.OFFICIAL, "cifar10", replace(group, resources=(res,)))
    return arrays


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".part") or "extracting" in p.name)


def test_good_download_extracts_and_loads(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _serve_cifar(server, monkeypatch)
    ds = load_dataset("cifar10", data_dir=tmp_path, download_url=server.url, progress=False)
    assert np.array_equal(ds.x_train.numpy(), arrays["x_train"]) and np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert ds.source == str(tmp_path / "cifar-10-batches-py")
    assert _leftovers(tmp_path) == []
    assert server.requests == ["/cifar-10-python.tar.gz"]
    load_dataset("cifar10", data_dir=tmp_path, download_url=server.url, progress=False)
    assert len(server.requests) == 1, "a present dataset is not downloaded again"


def test_md5_mismatch_removes_file(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_cifar(server, monkeypatch, md5="0" * 32)
    with pytest.raises(DataError, match=r"md5 mismatch for cifar-10-python\.tar\.gz downloaded from http://127\.0\.0\.1.*"
                                        r"expected 0{32}; the file was removed"):
        load_dataset("cifar10", data_dir=tmp_path, download_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_leaves_nothing(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_cifar(server, monkeypatch)
    server.drop.add("/cifar-10-python.tar.gz")
    size = len(server.files["/cifar-10-python.tar.gz"])
    with pytest.raises(DataError, match=rf"was cut off after {size // 2:,} of {size:,} bytes; nothing was saved as .*"
                                        r"cifar-10-python\.tar\.gz.*to work offline, place cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path, download_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_clear(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dl.URL_ENV, server.url + "/nothing-here")
    with pytest.raises(DataError, match=r"download of http://127\.0\.0\.1:\d+/nothing-here/cifar-100-python\.tar\.gz failed: HTTP 404"):
        load_dataset("cifar100", data_dir=tmp_path, progress=False)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "cifar-100-python.tar.gz").exists()


def test_unreachable_server(tmp_path: Path, server: _Server) -> None:
    url = server.url
    server.httpd.shutdown()
    server.httpd.server_close()
    server.__exit__ = lambda *a: None  # type: ignore[method-assign]
    with pytest.raises(DataError, match=r"download of .* failed after 0 bytes .*to work offline"):
        load_dataset("cifar10", data_dir=tmp_path, download_url=url, progress=False)


def test_offline_names_files_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"place cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py/) in {tmp_path}" in msg
    assert "--no-download" in msg
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    msg = str(err.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in msg
    assert f"in {tmp_path / 'mnist'} (1 of 4 present; missing train-labels-idx1-ubyte.gz" in msg


def test_mnist_download_with_dataset_placeholder(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    files, arrays = T.mnist_files()
    resources = []
    for name, blob in files.items():
        server.files[f"/mirror/fashion-mnist/{name}"] = blob
        resources.append(dl.Resource(name, hashlib.md5(blob).hexdigest()))
    monkeypatch.setitem(dl.OFFICIAL, "fashion-mnist", replace(dl.OFFICIAL["fashion-mnist"], resources=tuple(resources)))
    monkeypatch.setenv(dl.URL_ENV, server.url + "/mirror/{dataset}/")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, progress=False)
    assert np.array_equal(ds.x_train.numpy(), arrays["x_train"])
    assert sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir()) == sorted(files)


def test_partial_download_resumes_missing_files_only(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = T.mnist_files()
    resources = []
    for name, blob in files.items():
        server.files[f"/{name}"] = blob
        resources.append(dl.Resource(name, hashlib.md5(blob).hexdigest()))
    monkeypatch.setitem(dl.OFFICIAL, "mnist", replace(dl.OFFICIAL["mnist"], resources=tuple(resources)))
    first = next(iter(files))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / first).write_bytes(files[first])
    load_dataset("mnist", data_dir=tmp_path, download_url=server.url, progress=False)
    assert f"/{first}" not in server.requests and len(server.requests) == 3


def test_unsafe_member_in_downloaded_archive(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    blob = buf.getvalue()
    server.files["/cifar-10-python.tar.gz"] = blob
    group = replace(dl.OFFICIAL["cifar10"], resources=(dl.Resource("cifar-10-python.tar.gz", hashlib.md5(blob).hexdigest()),))
    monkeypatch.setitem(dl.OFFICIAL, "cifar10", group)
    data = tmp_path / "data"
    with pytest.raises(DataError, match=r"refusing archive member 'cifar-10-batches-py/\.\./\.\./escaped\.txt'"):
        load_dataset("cifar10", data_dir=data, download_url=server.url, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and _leftovers(data) == []


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError, match=rf"cannot create the data folder {blocker}.*--data-dir"):
        load_dataset("mnist", data_dir=blocker, download_url="http://127.0.0.1:9", progress=False)


def test_file_url_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local mirror folder works as a download base through a file:// address."""
    blob, arrays = T.cifar_archive_bytes("cifar100")
    mirror = tmp_path / "mirror" / "cifar100"
    mirror.mkdir(parents=True)
    (mirror / "cifar-100-python.tar.gz").write_bytes(blob)
    group = replace(dl.OFFICIAL["cifar100"], resources=(dl.Resource("cifar-100-python.tar.gz", hashlib.md5(blob).hexdigest()),))
    monkeypatch.setitem(dl.OFFICIAL, "cifar100", group)
    ds = load_dataset("cifar100-coarse", data_dir=tmp_path / "data", download_url=(tmp_path / "mirror").as_uri() + "/{dataset}",
                      progress=False)
    assert np.array_equal(ds.y_train.numpy(), arrays["coarse_train"]) and ds.num_classes == 20
