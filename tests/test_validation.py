"""Validation never touches the test set, and the training loop's fixes of issue 15:
the default held-out split, --val-split 0, three-way folder splits, a proof by shuffled test
labels, the run-folder module and the import layering, batches of one, --overwrite, resume
changes to the schedule, one scoring implementation, and progress lines off a terminal."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vggkit.config import TrainConfig
from vggkit.data import load_dataset
from vggkit.data import testing as T
from vggkit.data.sources.digits import load_digits_data
from vggkit.errors import UsageError
from vggkit.runfolder import RunFolder, read_metrics
from vggkit.sweep import can_chain
from vggkit.training.checkpoint import load_checkpoint
from vggkit.workflow import train

SRC = Path(__file__).resolve().parents[1] / "src" / "vggkit"
TINY = dict(model="vgg_compact", dataset="digits", image_size=8, batch_size=64, lr=0.05,
            report=False, precision="fp32", threads=1)


def tiny(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


# ----------------------------------------------------------------------------- the splits
def test_default_run_validates_on_a_holdout_of_the_training_set(tmp_path):
    summary = train(tiny(tmp_path, epochs=2), progress=False)
    raw = load_digits_data()
    assert summary["val_source"].startswith("train holdout")
    n_val = round(0.1 * len(raw.y_train))
    assert summary["val_size"] == n_val == summary["dataset"]["val"]
    assert summary["dataset"]["train"] + n_val == len(raw.y_train)
    assert summary["dataset"]["test"] == len(raw.y_test)
    assert summary["best_val_acc"] is not None and summary["best_epoch"] in (1, 2)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("val_acc" in r and "test_acc" not in r for r in rows)


def test_default_validation_sizes():
    ds = load_dataset("digits")
    raw = load_digits_data()
    assert len(ds.y_val) == round(0.1 * len(raw.y_train))
    assert len(ds.y_train) + len(ds.y_val) == len(raw.y_train)
    counted = load_dataset("digits", val_split=100)
    assert len(counted.y_val) == 100
    # stratified: every class keeps its share within one image
    shares = np.bincount(counted.y_val.numpy(), minlength=10)
    assert shares.max() - shares.min() <= 1


def test_official_datasets_hold_out_5000(tmp_path):
    T.write_mnist(tmp_path / "mnist", n_train=12000, n_test=20, size=8)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (7000, 5000, 20)


def test_folder_without_test_splits_three_ways_without_overlap(tmp_path):
    T.write_image_folder(tmp_path / "imgs", per_class=20, test_per_class=None, size=(6, 6))
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", data_dir=tmp_path / "cache")
    assert (len(ds.y_test), len(ds.y_val), len(ds.y_train)) == (12, 5, 43)

    def rows(x: torch.Tensor) -> set[bytes]:
        return {bytes(img.numpy().tobytes()) for img in x}

    train, val, test = rows(ds.x_train), rows(ds.x_val), rows(ds.x_test)
    assert not (train & val) and not (train & test) and not (val & test)
    # the test part does not move with the training seed
    other = load_dataset(f"folder:{tmp_path / 'imgs'}", data_dir=tmp_path / "cache", seed=7)
    assert rows(other.x_test) == test and rows(other.x_val) != val


def test_val_split_zero_selects_nothing_and_monitors_the_test_set(tmp_path):
    summary = train(tiny(tmp_path, epochs=2, val_split=0), progress=False)
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "best.safetensors").exists()
    assert (run / "checkpoints" / "last.safetensors").exists()
    assert summary["best_val_acc"] is None and summary["val_size"] == 0
    assert summary["val_source"].startswith("none")
    rows = read_metrics(run / "metrics.jsonl")
    assert all("test_acc" in r and "val_acc" not in r for r in rows)


@pytest.mark.parametrize("extra, flag", [({"schedule": "plateau"}, "plateau"),
                                         ({"early_stop": 2}, "early-stop")])
def test_val_split_zero_refuses_selection_on_test(tmp_path, extra, flag):
    with pytest.raises(UsageError, match=f"val.split 0: no validation split.*{flag}"):
        tiny(tmp_path).replace(val_split=0, **extra)


def test_val_split_must_be_fraction_or_count(tmp_path):
    with pytest.raises(UsageError, match="val_split must be a fraction .* or a whole number"):
        tiny(tmp_path).replace(val_split=2.5)
    with pytest.raises(UsageError, match="leaving none to train on"):
        load_dataset("digits", val_split=5000)


def _digits_npz(path: Path, shuffle_test: bool) -> None:
    raw = load_digits_data()
    y_test = raw.y_test.copy()
    if shuffle_test:
        y_test = np.random.default_rng(1).permutation(y_test)
    np.savez(path, x_train=raw.x_train[:, 0], y_train=raw.y_train, x_test=raw.x_test[:, 0],
             y_test=y_test)


def test_test_labels_never_reach_selection_schedule_or_stopping(tmp_path):
    """Train twice, the second time with the test labels shuffled: the best checkpoint, the
    learning-rate curve and the stopping epoch are identical."""
    runs = {}
    for name, shuffle in (("real", False), ("shuffled", True)):
        _digits_npz(tmp_path / f"{name}.npz", shuffle)
        config = TrainConfig(**{**TINY, "dataset": f"npz:{tmp_path / name}.npz",
                                "out": str(tmp_path / name), "epochs": 8, "lr": 0.2,
                                "schedule": "plateau", "plateau_patience": 1, "gamma": 0.5,
                                "early_stop": 2})
        runs[name] = (train(config, progress=False), read_metrics(tmp_path / name / "metrics.jsonl"))
    (real, real_rows), (shuffled, shuffled_rows) = runs["real"], runs["shuffled"]
    assert real["test_acc"] != shuffled["test_acc"]  # the test labels did differ
    assert [r["lr"] for r in real_rows] == [r["lr"] for r in shuffled_rows]
    assert [r["val_acc"] for r in real_rows] == [r["val_acc"] for r in shuffled_rows]
    assert real["epochs_completed"] == shuffled["epochs_completed"]
    assert real["best_epoch"] == shuffled["best_epoch"]
    a = load_file(str(tmp_path / "real" / "checkpoints" / "best.safetensors"))
    b = load_file(str(tmp_path / "shuffled" / "checkpoints" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- layering
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_training_never_imports_evaluation():
    for path in (SRC / "training").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("vggkit.evaluation")
               or m in ("vggkit.workflow", "vggkit.sweep", "vggkit.cli")}
        assert not bad, f"{path.name} imports {bad}"
    code = ("import sys, vggkit.training.trainer, vggkit.runfolder; "
            "print(sorted(m for m in sys.modules if m.startswith('vggkit.evaluation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_run_folder_files_are_owned_by_one_module():
    """No other module spells the run folder's file names."""
    names = ("metrics.jsonl", "summary.json", "predictions.npz")
    for path in SRC.rglob("*.py"):
        if path.name in ("runfolder.py",):
            continue
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text, f"{path.relative_to(SRC)} spells {name}"


# ----------------------------------------------------------------------------- loop fixes
def test_a_final_batch_of_one_is_folded_into_the_previous(tmp_path):
    # 65 images at batch 64 would leave one image for the BatchNorm1d head
    summary = train(tiny(tmp_path, epochs=1, subset=65, image_size=32), progress=False)
    assert summary["epochs_completed"] == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["train_samples"] == 65


def test_overwrite_starts_afresh_and_keeps_foreign_files(tmp_path):
    train(tiny(tmp_path, epochs=2), progress=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "checkpoints" / "stale.safetensors").write_bytes(b"x")
    train(tiny(tmp_path, epochs=1, val_split=0, overwrite=True), progress=False)
    run = tmp_path / "run"
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert not (run / "checkpoints" / "best.safetensors").exists()  # the old run's best
    # a checkpoint vggkit did not write is the user's: it stays (issue 32)
    assert (run / "checkpoints" / "stale.safetensors").read_bytes() == b"x"
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["epoch"] == 1
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "triangle"])
def test_resume_refuses_a_new_length_under_a_total_dependent_schedule(tmp_path, schedule):
    train(tiny(tmp_path, epochs=1, schedule=schedule), progress=False)
    with pytest.raises(UsageError, match=r"--epochs 2: .*planned for 1 epochs"):
        train(TrainConfig(resume=str(tmp_path / "run"), epochs=2), progress=False)


def test_resume_refuses_another_batch_size(tmp_path):
    train(tiny(tmp_path, epochs=1, schedule="constant"), progress=False)
    with pytest.raises(UsageError, match="--batch-size 32"):
        train(TrainConfig(resume=str(tmp_path / "run"), epochs=2, batch_size=32),
              progress=False)


def test_resume_extends_an_epoch_independent_schedule(tmp_path):
    train(tiny(tmp_path, epochs=1, schedule="constant"), progress=False)
    summary = train(TrainConfig(resume=str(tmp_path / "run"), epochs=2), progress=False)
    assert summary["epochs_completed"] == 2


def test_sweep_never_chains_lookahead():
    assert can_chain(TrainConfig(schedule="step"))
    assert not can_chain(TrainConfig(schedule="step", lookahead=True))


def test_one_scoring_implementation_for_training_and_evaluate():
    from vggkit.evaluation.metrics import classification_metrics
    from vggkit.training.scoring import score

    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # a tie: first index wins
                           [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],   # top-5 ties: stable order
                           [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 6, 6])
    ours = score(logits, labels)
    theirs = classification_metrics(logits.numpy(), labels.numpy(), [str(i) for i in range(7)])
    assert ours["acc"] == theirs["top1"] == pytest.approx(1 / 3)
    assert ours["top5_acc"] == theirs["top5"] == pytest.approx(2 / 3)
    assert ours["loss"] == theirs["loss"]


def test_progress_lines_when_output_is_not_a_terminal(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vggkit.train")
    logging.getLogger("vggkit").propagate = True
    train(tiny(tmp_path, epochs=1, batch_size=8, log_every=0.0001), progress=True)
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert lines and "ETA" in lines[0] and "img/s" in lines[0]
    assert lines[0].startswith("epoch 1/1  step ")


def test_run_folder_round_trip(tmp_path):
    run = RunFolder(tmp_path / "r").create(resuming=False, overwrite=False)
    run.append_metrics({"epoch": 1, "x": 1.5})
    with open(run.metrics_path, "a") as f:
        f.write('{"epoch": 2, "x"')  # a torn line from a crash
    assert run.read_metrics() == [{"epoch": 1, "x": 1.5}]
    run.write_summary({"test_acc": 0.5})
    assert json.loads(run.summary_path.read_text()) == run.read_summary() == {"test_acc": 0.5}
    run.write_predictions(np.zeros((2, 3), np.float32), np.array([0, 2]))
    logits, labels = run.read_predictions()
    assert logits.shape == (2, 3) and labels.tolist() == [0, 2]
