"""torchrun on CPU (gloo on 127.0.0.1): identical weights on both ranks, every sample once
per epoch, resume across process counts, and a dead rank ending the other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training import distributed as D
from vggkit.training.checkpoint import load_checkpoint
from vggkit.runfolder import read_metrics
from vggkit.workflow import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available in this build")

# a constant rate, so that the runs below may be resumed to more epochs (a one-cycle run may not)
ARGS = ["--model", "vgg_compact", "--dataset", "digits", "--image-size", "8", "--batch-size", "32", "--lr", "0.05",
        "--schedule", "constant",
        "--precision", "fp32", "--no-report", "--crop-padding", "1", "--flip"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None,
             entry: list[str] = ("-m", "vggkit")) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           *entry, "train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "VGGKIT_DIST_TIMEOUT": "30", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)


def long_run_past_its_first_epoch(run: Path) -> subprocess.Popen:
    """A 500-epoch torchrun run, once its first epoch is written."""
    proc = torchrun([*ARGS, "--epochs", "500", "--out", str(run)])
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


def test_two_processes_train_one_model_and_resume_either_way(tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun([*ARGS, "--epochs", "2", "--out", str(run), "--json"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"]["world_size"] == 2
    digests = summary["rank_weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks end with equal weights
    for row in read_metrics(run / "metrics.jsonl"):
        # the two shards together cover the training set exactly once per epoch
        assert row["train_samples"] == summary["dataset"]["train"]
    # only rank 0 writes: one line per epoch, not two
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]

    # a distributed checkpoint resumes in a single process ...
    single = tmp_path / "single"
    shutil.copytree(run, single)
    result = train(TrainConfig(resume=str(single), epochs=3), progress=False)
    assert result["epochs_completed"] == 3 and result["engine"]["world_size"] == 1
    # ... and a single-process checkpoint resumes under torchrun
    proc = torchrun(["--resume", str(single), "--epochs", "4"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert load_checkpoint(single / "checkpoints" / "last.safetensors").meta["epoch"] == 4


def test_each_rank_resumes_its_own_dropout_stream(tmp_path):
    """Two processes, 2 epochs in one go == 1 epoch, then --resume to 2: each rank's RNG state
    is saved and restored (all ranks restoring rank 0's drew the same dropout masks)."""
    runs = {name: tmp_path / name for name in ("straight", "split")}
    for args in ([*ARGS, "--epochs", "2", "--out", str(runs["straight"])],
                 [*ARGS, "--epochs", "1", "--out", str(runs["split"])],
                 ["--resume", str(runs["split"]), "--epochs", "2"]):
        proc = torchrun(args)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    rng = load_checkpoint(runs["split"] / "checkpoints" / "last.safetensors").rng
    assert {"torch", "torch@1"} <= rng.keys() and not torch.equal(rng["torch"], rng["torch@1"])
    digests = [json.loads((run / "summary.json").read_text())["weights_digest"]
               for run in runs.values()]
    assert digests[0] == digests[1]


def test_a_dead_rank_ends_the_other_with_an_error(tmp_path):
    run = tmp_path / "dies"
    proc = long_run_past_its_first_epoch(run)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                             ).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the surviving rank hung after its peer died")
    assert proc.returncode != 0
    assert time.time() - killed_at < 90
    assert "failed" in err.lower() or "error" in err.lower()


def test_sigterm_to_the_group_leaves_one_resumable_checkpoint(tmp_path):
    """SIGTERM to the whole torchrun group (torchrun forwards its own too): the ranks agree
    on the step to stop at, rank 0 writes one checkpoint, every rank exits cleanly, and the
    run resumes under the same two processes; in one process, whose batches of the epoch are
    counted differently, the mid-epoch resume is refused in one line."""
    run = tmp_path / "term"
    proc = long_run_past_its_first_epoch(run)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the ranks hung after SIGTERM")
    assert err.count("interrupted by") >= 1, err[-3000:]
    assert "Timeout" not in err and "timed out" not in err.lower(), err[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    done = ckpt.meta["epoch"] + 1
    if ckpt.meta["batch"]:
        with pytest.raises(UsageError, match="stopped mid-epoch .* resume it with 2, not 1"):
            train(TrainConfig(resume=str(run), epochs=done), progress=False)
    again = torchrun(["--resume", str(run), "--epochs", str(done)])
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == done


# vggkit's CLI with every decode of a folder logged (process, size) and slowed down, as the
# first decode of a 63 MB JPEG zip is
DECODE_WRAPPER = """
import os, sys, time
import vggkit.data.sources.folder as folder
decode_and_cache = folder._decode_and_cache
def slow_decode_and_cache(src, path, name, image_size, *args, **kwargs):
    with open(os.environ["DECODE_LOG"], "a") as log:
        log.write(f"{os.getpid()} {image_size}\\n")
    time.sleep(float(os.environ["SLOW_DECODE_S"]))
    return decode_and_cache(src, path, name, image_size, *args, **kwargs)
folder._decode_and_cache = slow_decode_and_cache
from vggkit.cli import main
sys.exit(main())
"""


def write_image_zip(path: Path) -> None:
    """train/ and test/ folders of two classes of 8x8 PNG images, dark and light."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, count in (("train", 24), ("test", 8)):
            for label, base in (("dark", 40), ("light", 200)):
                for i in range(count):
                    pixels = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255)
                    blob = io.BytesIO()
                    Image.fromarray(pixels.astype(np.uint8)).save(blob, format="PNG")
                    zf.writestr(f"{split}/{label}/{i}.png", blob.getvalue())


def folder_torchrun(tmp_path: Path, extra: list[str], slow_s: float) -> tuple[str, list]:
    """Two processes train 1 epoch on a zip of 8x8 images, each decode taking ``slow_s``
    longer, with a collective timeout of 3 s: (stderr, [(process, size) per decode])."""
    source = tmp_path / "shapes.zip"
    write_image_zip(source)
    wrapper = tmp_path / "slow_decode_vggkit.py"
    wrapper.write_text(DECODE_WRAPPER)
    decodes = tmp_path / "decodes.txt"
    args = ["--model", "vgg_compact", "--dataset", f"folder:{source}", "--data-dir",
            str(tmp_path / "data"), "--batch-size", "8", "--epochs", "1", "--precision",
            "fp32", "--no-report", "--val-split", "0", "--out", str(tmp_path / "run"), *extra]
    proc = torchrun(args, entry=[str(wrapper)], env={
        "VGGKIT_DIST_TIMEOUT": "3", "SLOW_DECODE_S": str(slow_s), "DECODE_LOG": str(decodes)})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err, [line.split() for line in decodes.read_text().splitlines()]


def test_a_first_decode_longer_than_the_collective_timeout_trains(tmp_path):
    """The first decode of a folder zip (8 s here) outlasts VGGKIT_DIST_TIMEOUT (3 s): the
    rank that waits for it waits on the data group's own long timeout, so the run trains."""
    err, _ = folder_torchrun(tmp_path, ["--image-size", "8"], 8)
    assert "cached the decoded images" in err  # the slow first decode did run
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"]["world_size"] == 2 and summary["epochs_completed"] == 1


def test_a_folder_that_needs_resizing_is_decoded_once_a_node(tmp_path):
    """8x8 images for a network that takes 32x32: local rank 0 decodes the folder, then
    decodes it at 32 while the other rank waits (on the data group's long timeout), and the
    other rank reads that from the cache instead of decoding it again."""
    _, decodes = folder_torchrun(tmp_path, [], 4)
    assert [size for _, size in decodes] == ["None", "32"]
    assert len({pid for pid, _ in decodes}) == 1


@pytest.mark.parametrize("name", ["VGGKIT_DIST_TIMEOUT", "VGGKIT_DATA_TIMEOUT"])
@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_malformed_timeout_variable_is_a_one_line_error_naming_it(monkeypatch, name, value):
    read = {"VGGKIT_DIST_TIMEOUT": D.timeout_seconds,
            "VGGKIT_DATA_TIMEOUT": D.data_timeout_seconds}[name]
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=rf"\${name}='{value}'"):
        read()
    monkeypatch.setenv(name, " 45 ")
    assert read() == 45
    monkeypatch.delenv(name)
    assert read() == {"VGGKIT_DIST_TIMEOUT": D.DEFAULT_TIMEOUT_S,
                      "VGGKIT_DATA_TIMEOUT": D.DEFAULT_DATA_TIMEOUT_S}[name]
