"""Training: the run folder, exact resume, signals, precision, schedules, init-from."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from interrupt import interrupted_run
from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training.checkpoint import load_checkpoint, model_from_checkpoint
from vggkit.training.optim import Schedule
from vggkit.runfolder import read_metrics
from vggkit.training.trainer import NonFiniteLoss
from vggkit.workflow import train

# vgg_compact at the digits' native 8x8 (three poolings divide it): a run takes seconds.
TINY = dict(model="vgg_compact", dataset="digits", image_size=8, batch_size=64, lr=0.05, report=False,
            precision="fp32", crop_padding=1, flip=True)


def tiny(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


def test_run_folder_holds_every_artefact(tmp_path):
    summary = train(tiny(tmp_path, epochs=2), progress=False)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                "epoch_seconds", "images_per_second"):
        assert all(key in r for r in rows), key
    assert rows[0]["train_samples"] == summary["dataset"]["train"]
    saved = json.loads((run / "summary.json").read_text())
    for key in ("test_loss", "test_acc", "top5_acc", "best_epoch", "train_seconds",
                "images_per_second", "params", "precision", "software", "machine"):
        assert key in saved, key
    assert saved["precision"] == "fp32"
    assert saved["params"]["trainable"] > 0 and saved["software"]["torch"] == torch.__version__
    assert 0 < saved["test_acc"] <= 1 and saved["train_seconds"] > 0
    for name in ("last", "best"):
        ckpt = load_checkpoint(run / "checkpoints" / f"{name}.safetensors")
        assert ckpt.classes == [str(i) for i in range(10)]
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["epoch"] == 2


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    train(tiny(tmp_path, epochs=1), progress=False)
    model, ckpt = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    c, h, w = ckpt.meta["image_shape"]
    assert model(torch.zeros(2, c, h, w)).shape == (2, 10)
    assert len(ckpt.meta["mean"]) == c


def test_existing_run_folder_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty.*--resume.*--overwrite"):
        train(tiny(tmp_path, epochs=1), progress=False)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_resume_is_bit_for_bit(tmp_path):
    """4 epochs straight == 2 epochs, then --resume to 4 (fp32, CPU). The schedule must not
    depend on the total epochs for this to be the same training: a step schedule here;
    the mid-epoch test below covers the one-cycle default."""
    kw = dict(schedule="step", step_size=1, gamma=0.5)
    train(tiny(tmp_path, "straight", epochs=4, **kw), progress=False)
    train(tiny(tmp_path, "split", epochs=2, **kw), progress=False)
    summary = train(TrainConfig(resume=str(tmp_path / "split"), epochs=4), progress=False)
    assert summary["epochs_completed"] == 4
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["train_loss"] for r in straight] == [r["train_loss"] for r in split]


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vggkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_resume_finishes(tmp_path, sig):
    run = tmp_path / "run"
    # constant rate: the resume below stops the run short, which a schedule planned for its
    # total length (the one-cycle default) refuses
    proc = run_cli(["train", "--model", "vgg_compact", "--image-size", "8", "--epochs", "200", "--batch-size", "32",
                    "--schedule", "constant", "--precision", "fp32", "--no-report", "--out", str(run)])
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run / "metrics.jsonl").exists(), proc.communicate()[1] if proc.poll() is not None else "no epoch finished"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"vggkit train --resume {run}" in err
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ckpt.meta["epoch"] >= 1
    done = ckpt.meta["epoch"] + 1
    summary = train(TrainConfig(resume=str(run), epochs=done), progress=False)
    assert summary["epochs_completed"] == done
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, done + 1))


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """A stop after batch k of an epoch resumes at batch k+1 with the same weights as a
    run that never stopped."""
    train(tiny(tmp_path, "straight", epochs=2), progress=False)
    # step 30 is in epoch 2 (digits less its validation split: 21 batches of 64)
    interrupted_run(monkeypatch, tiny(tmp_path, "split", epochs=2), 30)
    meta = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").meta
    assert (meta["epoch"], meta["batch"]) == (1, 30 - 21)
    train(TrainConfig(resume=str(tmp_path / "split")), progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_last_good_checkpoint_intact(tmp_path):
    train(tiny(tmp_path, epochs=1), progress=False)
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").model_state
    with pytest.raises(NonFiniteLoss, match=r"try --lr .*last good checkpoint"):
        train(TrainConfig(resume=str(tmp_path / "run"), epochs=3, lr=1e12, schedule="constant"),
              progress=False)
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert after.meta["epoch"] == 1
    assert all(torch.equal(before[k], after.model_state[k]) for k in before)


def test_a_bf16_run_that_diverges_is_told_how_to_continue_in_fp32(tmp_path):
    """The message names the resume that keeps the epochs done; following it works."""
    train(tiny(tmp_path, epochs=1, precision="bf16"), progress=False)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as err:
        train(TrainConfig(resume=str(run), epochs=3, lr=1e12, schedule="constant"),
              progress=False)
    assert str(err.value).endswith(f"continue it in fp32: vggkit train --resume {run} "
                                   "--precision fp32")
    # the failed resume saved its --lr 1e12 in the run's config: give a sane one back
    done = train(TrainConfig(resume=str(run), epochs=2, precision="fp32", lr=0.04,
                             schedule="constant"), progress=False)
    assert done["epochs_completed"] == 2 and done["precision"] == "fp32"


def test_bf16_and_fp32_reach_the_same_accuracy_on_digits(tmp_path):
    """Real data (scikit-learn's digits), same seed: bf16 autocast ends within 3 points."""
    kw = dict(model="vgg_compact", dataset="digits", image_size=8, epochs=6, batch_size=64, lr=0.05,
              report=False, crop_padding=1)
    fp32 = train(TrainConfig(**kw, precision="fp32", out=str(tmp_path / "a")), progress=False)
    bf16 = train(TrainConfig(**kw, precision="bf16", out=str(tmp_path / "b")), progress=False)
    assert bf16["precision"] == "bf16"
    assert fp32["test_acc"] > 0.9
    assert abs(fp32["test_acc"] - bf16["test_acc"]) < 0.03


def test_init_from_a_shallower_run(tmp_path, caplog):
    train(tiny(tmp_path, "small", model="vgg11_bn", epochs=1, image_size=32, subset=128),
          progress=False)
    caplog.set_level("INFO", logger="vggkit")
    summary = train(tiny(tmp_path, "deep", model="vgg13_bn", epochs=1, image_size=32, subset=128,
                         init_from=str(tmp_path / "small")), progress=False)
    assert summary["epochs_completed"] == 1
    assert any("--init-from" in r.message and "loaded" in r.message for r in caplog.records)


def test_early_stop(tmp_path):
    summary = train(tiny(tmp_path, epochs=30, lr=1e-9, schedule="constant", early_stop=2),
                    progress=False)
    assert summary["stopped_early"] and summary["epochs_completed"] < 30


@pytest.mark.parametrize("kind", ["constant", "step", "cosine", "onecycle", "time-decay", "plateau"])
def test_schedules(kind):
    s = Schedule(kind, base_lr=0.1, steps_per_epoch=10, epochs=10, step_size=3, gamma=0.1,
                 decay=1e-2, plateau_patience=2)
    rates = [s.lr_at(i) for i in range(100)]
    assert all(r >= 0 and math.isfinite(r) for r in rates)
    if kind == "constant":
        assert set(rates) == {0.1}
    if kind == "step":
        assert rates[29] == pytest.approx(0.1) and rates[30] == pytest.approx(0.01)
    if kind == "cosine":
        assert rates[0] == pytest.approx(0.1) and rates[99] < 1e-3
    if kind == "onecycle":
        assert max(rates) == pytest.approx(0.1, rel=0.05) and rates[99] < 0.01 and rates[0] < 0.02
    if kind == "time-decay":  # Keras legacy decay: lr / (1 + decay * iterations)
        assert rates[50] == pytest.approx(0.1 / (1 + 1e-2 * 50))
    if kind == "plateau":
        assert not s.end_epoch(0.5) and not s.end_epoch(0.5)
        assert s.end_epoch(0.4) and s.lr_at(0) == pytest.approx(0.01)


def test_warmup_rises_linearly():
    s = Schedule("cosine", base_lr=1.0, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)


def test_resume_flags_equal_to_defaults_still_count(tmp_path):
    """`--resume RUN --epochs 12` extends a 1-epoch run to 12 even though 12 is the default."""
    from vggkit.cli import main

    run = tmp_path / "run"
    train(tiny(tmp_path, epochs=1, schedule="constant"), progress=False)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", str(TrainConfig().epochs),
                 "--quiet", "--no-report"]) == 0
    assert read_metrics(run / "metrics.jsonl")[-1]["epoch"] == TrainConfig().epochs
