"""Issue 18's "done when": a hymenoptera-style folder trains with no flag, a piped run prints
progress lines, and a sweep killed mid-run resumes its interrupted run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from vggkit.config import TrainConfig
from vggkit.runfolder import read_metrics
from vggkit.workflow import train


def cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vggkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def photo(rng: np.random.Generator, size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if fmt == "GIF":
        image = image.convert("P")
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_a_folder_of_photos_in_many_formats_and_sizes_trains_with_no_flag(tmp_path):
    """Ants and bees as people have them: JPEGs of several sizes with a GIF, a WebP and a
    TIFF among them, a .JPG in capitals; no --image-size, no --skip-bad-images."""
    rng = np.random.default_rng(0)
    odd = [("GIF", "gif"), ("TIFF", "tif"), ("JPEG", "JPG")]
    if features.check("webp"):
        odd.append(("WEBP", "webp"))
    for split, n in (("train", 8), ("val", 3)):
        for cls in ("ants", "bees"):
            folder = tmp_path / "hymenoptera" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                size = (40 + 7 * i, 30 + 5 * i)
                (folder / f"{i}.jpg").write_bytes(photo(rng, size, "JPEG"))
            for fmt, ext in odd:
                (folder / f"odd.{ext}").write_bytes(photo(rng, (50, 37), fmt))
    summary = train(TrainConfig(model="vgg_compact", dataset=f"folder:{tmp_path / 'hymenoptera'}",
                                data_dir=str(tmp_path / "cache"), epochs=1, batch_size=8,
                                precision="fp32", report=False, threads=1,
                                out=str(tmp_path / "run")), progress=False)
    per_class = 8 + len(odd)
    assert summary["dataset"]["train"] + summary["val_size"] == 2 * per_class
    assert summary["dataset"]["test"] == 2 * (3 + len(odd)) and summary["skipped_images"] == 0


def test_a_piped_run_prints_progress_lines(tmp_path):
    proc = cli(["train", "--model", "vgg_compact", "--image-size", "32", "--epochs", "1",
                "--subset", "800", "--batch-size", "16", "--precision", "fp32", "--no-report",
                "--log-every", "0.2", "--out", str(tmp_path / "run")])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    lines = [line for line in err.splitlines() if " step " in line]
    assert lines and all("ETA" in line and "img/s" in line and "loss" in line for line in lines)


def test_a_sweep_killed_mid_run_resumes_that_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["sweep", "--vary", "lr=0.05,0.02", "--model", "vgg_compact", "--image-size", "8",
            "--epochs", "4", "--subset", "400", "--schedule", "constant", "--precision",
            "fp32", "--no-report", "--out", str(sweep)]
    proc = cli(args)
    metrics = sweep / "01-lr-0.05" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and len(read_metrics(metrics)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_metrics(metrics)
    if not before or len(before) >= 4:
        pytest.skip("the sweep was not caught mid-run on this machine")
    proc = cli(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming the interrupted attempt" in err
    after = read_metrics(metrics)
    assert [r["epoch"] for r in after] == list(range(1, 5))
    assert after[0] == before[0]  # the first epoch was kept, not trained again
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert all(r["status"] == "done" for r in manifest["runs"])
