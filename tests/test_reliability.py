"""Faults: SIGKILL at random moments and mid-checkpoint, a full disk, unwritable output,
checkpoints that do not fit, out-of-memory. Nothing the user had is lost."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vggkit.cli import main
from vggkit.config import TrainConfig
from vggkit.errors import CheckpointError, UsageError
from vggkit.training import checkpoint as C
from vggkit.training.checkpoint import load_checkpoint
from vggkit.runfolder import read_metrics
from vggkit.workflow import train

TINY = ["--model", "vgg_compact", "--image-size", "8", "--batch-size", "64", "--precision",
        "fp32", "--no-report"]


def tiny(out: Path, **kw) -> TrainConfig:
    # constant rate: the tests resume runs to more epochs, which a one-cycle run refuses
    return TrainConfig(**{"model": "vgg_compact", "image_size": 8, "batch_size": 64,
                          "schedule": "constant", "precision": "fp32", "report": False,
                          "out": str(out), **kw})


def start(args: list[str], prelude: str = "") -> subprocess.Popen:
    code = prelude + "\nimport sys\nfrom vggkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)


def assert_run_is_consistent(run: Path) -> None:
    """Whatever moment the kill hit: every line of metrics.jsonl reads, and the last
    checkpoint (if one was written yet) loads."""
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            json.loads(line)  # no torn line
    last = run / "checkpoints" / "last.safetensors"
    if last.exists():
        load_checkpoint(last)


def test_sigkill_at_random_moments_leaves_a_resumable_run(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(1234)
    proc = start([*TINY, "--epochs", "4", "--out", str(run)])
    wait_for(run / "config.yaml", proc)
    for _ in range(3):
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert_run_is_consistent(run)
        proc = start(["--resume", str(run)])
        wait_for(run / "checkpoints" / "last.safetensors", proc)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 5))
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["epoch"] == 4


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """The second checkpoint write is killed halfway through its bytes."""
    run = tmp_path / "run"
    prelude = textwrap.dedent("""
        import os, signal, safetensors.torch as st
        real = st.save_file
        calls = {"n": 0}
        def dying_save(tensors, filename, metadata=None):
            calls["n"] += 1
            if calls["n"] == 3:  # last(1), best(1), then last(2): die inside it
                real(tensors, filename, metadata=metadata)
                size = os.path.getsize(filename)
                with open(filename, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, filename, metadata=metadata)
        st.save_file = dying_save
        import vggkit.training.checkpoint as c
        c.save_file = dying_save
    """)
    proc = start([*TINY, "--epochs", "3", "--out", str(run)], prelude)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert_run_is_consistent(run)
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["epoch"] == 1
    leftovers = list((run / "checkpoints").glob(".*tmp*"))
    assert leftovers  # the torn temporary file, never the real name
    summary = train(TrainConfig(resume=str(run)), progress=False)
    assert summary["epochs_completed"] == 3


def test_torn_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, epochs=2), progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash mid-write
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    train(TrainConfig(resume=str(run), epochs=3), progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(run, epochs=1), progress=False)
    before = load_checkpoint(run / "checkpoints" / "last.safetensors").model_state

    def no_space(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C, "save_file", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        train(TrainConfig(resume=str(run), epochs=2), progress=False)
    after = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert after.meta["epoch"] == 1
    assert all(torch.equal(before[k], after.model_state[k]) for k in before)
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the temporary file is removed


def test_unwritable_output_folder_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write there" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_resume_with_another_architecture_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, epochs=1), progress=False)
    with pytest.raises(CheckpointError, match="does not fit vgg11_bn"):
        train(TrainConfig(resume=str(run), model="vgg11_bn", image_size=32, epochs=2),
              progress=False)


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys, command):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    argv = {"evaluate": [str(bogus)], "predict": [str(bogus), str(bogus)],
            "export": [str(bogus), "--onnx", str(tmp_path / "m.onnx")]}[command]
    assert main([command, *argv]) == 1
    err = capsys.readouterr().err
    assert str(bogus) in err and "Traceback" not in err


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, capsys, monkeypatch):
    import vggkit.training.trainer as T

    def oom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(T.TrainStep, "__call__", oom)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    assert "smaller --batch-size" in capsys.readouterr().err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(UsageError):
        main(["train", "--epochs", "0", "--debug"])
