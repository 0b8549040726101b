"""vggkit lr-find and --lr auto: the range test's suggestion trains."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training.lr_find import lr_find, plot, suggest
from vggkit.workflow import train

TINY = dict(model="vgg_compact", dataset="digits", image_size=8, batch_size=64,
            precision="fp32", report=False, threads=1)


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = [0.001, 0.01, 0.1, 1.0, 10.0]
    assert suggest(lrs, [2.0, 1.9, 1.0, 0.9, 3.0]) == pytest.approx(0.01)
    assert suggest(lrs, [2.0, 2.1, 2.2, 2.3, 2.4]) == pytest.approx(0.0001)  # never falls


def test_the_suggested_rate_trains(tmp_path):
    found = lr_find(TrainConfig(**TINY), steps=120)
    assert 1e-5 < found.suggestion < 5.0
    assert found.lrs == sorted(found.lrs) and len(found.lrs) == len(found.losses) >= 5
    assert min(found.losses) < found.losses[0]  # the loss did fall before it blew up
    png = plot(found, tmp_path / "lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = train(TrainConfig(**TINY, lr=found.suggestion, epochs=4,
                                out=str(tmp_path / "run")), progress=False)
    assert summary["test_acc"] > 0.5  # 10 classes, 84 steps: well above chance (0.1)


def test_train_lr_auto_records_the_number(tmp_path):
    config = TrainConfig(**TINY, epochs=1, out=str(tmp_path / "run")).replace(lr="auto")
    train(config, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert isinstance(saved["lr"], float) and saved["lr"] > 0


def test_bad_range_is_a_usage_error():
    with pytest.raises(UsageError, match="lr-find"):
        lr_find(TrainConfig(**TINY), steps=5)
    with pytest.raises(UsageError, match="lr must be a positive number or 'auto'"):
        TrainConfig().replace(lr="fast")


def test_cli_prints_the_suggestion(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vggkit", "lr-find", "--model", "vgg_compact", "--image-size",
         "8", "--precision", "fp32", "--steps", "40", "--plot", str(tmp_path / "p.png"),
         "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("suggested --lr ") and (tmp_path / "p.png").is_file()
