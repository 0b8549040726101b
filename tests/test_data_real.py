"""The real data in ../shared/data (skipped cleanly when it is absent)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from vggkit.data import load_dataset

SHARED = Path(os.environ.get("VGGKIT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
MNIST = SHARED / "mnist"
CIFAR_ZIP = SHARED / "cifar10-jpg.zip"


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason=f"no MNIST in {MNIST}")
def test_shared_mnist() -> None:
    ds = load_dataset("mnist", data_dir=SHARED, download=False, progress=False)
    # 5,000 of the 60,000 training images are held out for validation by default
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (55_000, 5_000, 10_000)
    assert ds.image_shape == (1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert (torch.bincount(ds.y_train) + torch.bincount(ds.y_val)).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the official order
    assert abs(ds.mean[0] - 0.1307) < 1e-4 and abs(ds.std[0] - 0.3081) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"no {CIFAR_ZIP}")
def test_shared_cifar10_zip_and_its_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_dataset(f"folder:{CIFAR_ZIP}", data_dir=tmp_path, progress=False)
    assert not first.from_cache
    assert (len(first.y_train), len(first.y_val), len(first.y_test)) == (45_000, 5_000, 10_000)
    assert first.image_shape == (3, 32, 32)
    assert first.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(first.y_train).tolist() == [4500] * 10  # stratified holdout
    assert torch.bincount(first.y_val).tolist() == [500] * 10
    assert torch.bincount(first.y_test).tolist() == [1000] * 10
    assert all(abs(m - r) < 0.01 for m, r in zip(first.mean, (0.4914, 0.4822, 0.4465)))
    with caplog.at_level(logging.INFO, logger="vggkit.data"):
        second = load_dataset(f"folder:{CIFAR_ZIP}", data_dir=tmp_path, progress=False)
    assert second.from_cache and "from the decoded-image cache" in caplog.text
    assert torch.equal(second.x_train, first.x_train) and torch.equal(second.y_test, first.y_test)
