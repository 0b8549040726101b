"""vggkit sweep: one run per value, a comparison report, errors up front, exact epochs chains."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from vggkit.cli import main
from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit import sweep as sweep_mod
from vggkit.sweep import parse_vary, plan_sweep, run_sweep
from vggkit.runfolder import read_metrics

# vgg_compact at the digits' native 8x8: a run takes seconds.
TINY = ["--model", "vgg_compact", "--dataset", "digits", "--image-size", "8", "--batch-size",
        "64", "--precision", "fp32", "--no-report", "--crop-padding", "1", "--flip",
        "--threads", "1", "--subset", "400"]
LEARN_EPOCHS = 3  # enough for the tiny runs to learn the digits well above chance
TIME_KEYS = ("epoch_seconds", "images_per_second", "elapsed_seconds")


def tiny_config(out: Path, **kw) -> TrainConfig:
    base = dict(model="vgg_compact", dataset="digits", image_size=8, batch_size=64, lr=0.05,
                precision="fp32", report=False, crop_padding=1, flip=True, threads=1,
                subset=400, out=str(out))
    return TrainConfig(**{**base, **kw})


def test_sweep_over_two_values_writes_two_runs_and_one_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    every_digit = TINY[:TINY.index("--subset")]  # ~1,300 training images: ~20 steps an epoch
    args = ["sweep", *every_digit, "--epochs", str(LEARN_EPOCHS), "--schedule",
            "constant", "--vary", "lr=0.05,0.02", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["vggkit", *args])
    code = main(args)
    assert code == 0
    runs = sorted(p for p in out.iterdir() if p.is_dir() and p.name != "report_files")
    assert [p.name for p in runs] == ["01-lr-0.05", "02-lr-0.02"]
    for run, lr in zip(runs, (0.05, 0.02)):
        summary = json.loads((run / "summary.json").read_text())
        # both runs learn the ten digits (chance: 10%)
        assert summary["test_acc"] >= 0.5, f"lr {lr}: {summary['test_acc']:.0%}"
        assert summary["epochs_completed"] == LEARN_EPOCHS
        assert read_metrics(run / "metrics.jsonl")[0]["lr"] == pytest.approx(lr)
        # each run names the command that made it (a results row quotes it)
        assert summary["command"] == "vggkit " + shlex.join(args)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    md = (out / "report.md").read_text()
    assert "01-lr-0.05" in md and "02-lr-0.02" in md
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    assert manifest["vary"] == {"lr": ["0.05", "0.02"]}
    printed = capsys.readouterr().out
    for word in ("run", "values", "test acc", "best acc", "epochs", "time of learning",
                 "01-lr-0.05", "lr=0.02", "report.html"):
        assert word in printed


@pytest.mark.parametrize("vary, message", [
    ("epoch=1,2", "unknown key 'epoch'"),
    ("epochs=1,x", "must be an integer"),
    ("epochs=1,0", "positive"),
    ("optimizer=sgd,lion", "lion"),
    ("out=a,b", "set by the sweep"),
    ("epochs", "KEY=V1,V2"),
    ("epochs=1,,2", "empty value"),
    ("epochs=1,1", "repeated"),
])
def test_bad_vary_fails_before_any_training(tmp_path, monkeypatch, capsys, vary, message):
    def no_training(*a, **k):
        raise AssertionError("trained despite a bad --vary")

    monkeypatch.setattr("vggkit.workflow.train", no_training)
    out = tmp_path / "sweep"
    # the bad value comes after a good one: nothing may run before the check
    code = main(["sweep", *TINY, "--vary", "lr=0.05,0.02", "--vary", vary, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_vary_parsing_and_plan():
    assert parse_vary(["batch-size=32,64", "betas=0.9,0.999;0.5,0.9"]) == [
        ("batch_size", ["32", "64"]), ("betas", ["0.9,0.999", "0.5,0.9"])]
    with pytest.raises(UsageError, match="given twice"):
        parse_vary(["lr=0.1", "lr=0.2"])
    with pytest.raises(UsageError, match="same config"):
        plan_sweep(TrainConfig(), parse_vary(["lr=0.1,1e-1"]), Path("x"))
    with pytest.raises(UsageError, match="resume"):
        plan_sweep(TrainConfig(resume="r"), parse_vary(["lr=0.1"]), Path("x"))
    # epochs chains: per combination of the other keys, only for epoch-independent schedules
    plan = plan_sweep(TrainConfig(schedule="constant"),
                      parse_vary(["epochs=20,10", "lr=0.1,0.2"]), Path("sw"))
    chained = {r.name: r.chained_from for r in plan}
    assert chained == {"01-epochs-20_lr-0.1": "03-epochs-10_lr-0.1",
                       "02-epochs-20_lr-0.2": "04-epochs-10_lr-0.2",
                       "03-epochs-10_lr-0.1": None, "04-epochs-10_lr-0.2": None}
    assert [r.name for r in sweep_mod._chain_order(plan)][:2] == [
        "03-epochs-10_lr-0.1", "01-epochs-20_lr-0.1"]
    for config in (TrainConfig(schedule="cosine"), TrainConfig(schedule="onecycle"),
                   TrainConfig(schedule="step", early_stop=2)):
        assert all(r.chained_from is None
                   for r in plan_sweep(config, parse_vary(["epochs=1,2"]), Path("x")))
    assert all(r.chained_from is None for r in plan_sweep(
        TrainConfig(schedule="constant"), parse_vary(["epochs=1,2"]), Path("x"), chain=False))
    # dataset paths make safe folder names
    plan = plan_sweep(TrainConfig(), parse_vary(["dataset=folder:/a/b/cifar10-jpg.zip"]),
                      Path("x"))
    assert plan[0].name == "01-dataset-folder-cifar10-jpg"


def test_epochs_chain_equals_separate_runs(tmp_path):
    """The chained run to 3 epochs (the 2-epoch run continued) is the 3-epoch run trained
    from scratch: same weights, same per-epoch metrics, same test result. The plateau
    schedule (its state is carried over) with a cut every epoch without progress, augmentation
    and dropout (RNG streams carried over) make a difference visible."""
    kw = dict(schedule="plateau", plateau_patience=1, gamma=0.5, lr=0.05, dropout=0.3)
    chained = run_sweep(tiny_config(tmp_path / "chained", **kw), ["epochs=3,2"],
                        progress=False)
    separate = run_sweep(tiny_config(tmp_path / "separate", **kw), ["epochs=3,2"],
                         chain=False, progress=False)
    assert [r["chained_from"] for r in chained["runs"]] == ["02-epochs-2", None]
    assert all(r["chained_from"] is None for r in separate["runs"])
    for a, b in zip(chained["runs"], separate["runs"]):
        assert a["status"] == b["status"] == "done"
        sa = json.loads((Path(a["run"]) / "summary.json").read_text())
        sb = json.loads((Path(b["run"]) / "summary.json").read_text())
        assert sa["weights_digest"] == sb["weights_digest"], a["name"]
        assert sa["test_acc"] == sb["test_acc"] and sa["test_loss"] == sb["test_loss"]
        assert sa["best_epoch"] == sb["best_epoch"]
        assert sa["epochs_completed"] == a["values"]["epochs"]
        ma = read_metrics(Path(a["run"]) / "metrics.jsonl")
        mb = read_metrics(Path(b["run"]) / "metrics.jsonl")
        strip = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in ma]
        assert strip == [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in mb]
        # time of learning counts the inherited epochs too
        assert sa["train_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in ma))
    run3 = tmp_path / "chained" / "01-epochs-3"
    assert json.loads((run3 / "summary.json").read_text())["run"] == str(run3)
    assert len(read_metrics(tmp_path / "chained" / "02-epochs-2" / "metrics.jsonl")) == 2


def test_a_failing_run_keeps_the_finished_ones_and_a_rerun_keeps_them(tmp_path, capsys):
    out = tmp_path / "sweep"
    # a well-formed dataset name whose file is missing: fails when that run loads its data
    missing = tmp_path / "missing.npz"
    args = ["sweep", *TINY, "--epochs", "1", "--vary", f"dataset=npz:{missing},digits",
            "--out", str(out)]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "failed" in printed and "missing" in printed
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["failed", "done"]
    assert (out / "02-dataset-digits" / "summary.json").is_file()
    assert "02-dataset-digits" in (out / "report.md").read_text()
    first = (out / "02-dataset-digits" / "summary.json").read_text()
    # the same sweep again: the finished run is kept as it is, the failed one retried
    assert main(args) == 1
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["failed", "kept"]
    assert (out / "02-dataset-digits" / "summary.json").read_text() == first


def test_sweep_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(UsageError, match="not a sweep folder"):
        run_sweep(tiny_config(tmp_path / "busy"), ["lr=0.1"], progress=False)
