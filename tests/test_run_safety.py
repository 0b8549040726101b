"""Nothing the user already had is lost: a run's own config.yaml reused as a template, an
--overwrite beside the user's files, and the resume edge cases (a run killed before its first
checkpoint, an early-stopped run, a mid-epoch resume under another number of processes)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from vggkit.cli import main
from vggkit.config import resolve_config
from vggkit.errors import UsageError
from vggkit.runfolder import read_metrics
from vggkit.training.engine import resolve_precision
from vggkit.training.resume import check_world_size

TINY = ["--model", "vgg_compact", "--image-size", "8", "--batch-size", "64", "--precision",
        "fp32", "--no-report", "--schedule", "constant", "--subset", "256"]


def train(*args: str) -> int:
    return main(["train", *TINY, *args])


def test_a_runs_own_config_reused_as_a_template_never_replaces_that_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "X"
    assert train("--out", str(run), "--overwrite", "--epochs", "1") == 0
    before = {p.name: p.read_bytes() for p in [run / "metrics.jsonl", run / "summary.json",
                                               run / "checkpoints" / "last.safetensors"]}
    assert yaml.safe_load((run / "config.yaml").read_text())["overwrite"] is True  # the record
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--config", str(run / "config.yaml"), "--epochs", "2"]) == 0
    assert {p.name: p.read_bytes() for p in [run / "metrics.jsonl", run / "summary.json",
                                             run / "checkpoints" / "last.safetensors"]} == before
    err = capsys.readouterr().err
    assert "written by the run in" in err and "out and overwrite are not used" in err
    new = [p for p in (tmp_path / "runs").iterdir()]
    assert len(new) == 1 and len(read_metrics(new[0] / "metrics.jsonl")) == 2
    # the template's recipe still acts; a plain (user-written) config file's out still does
    assert yaml.safe_load((new[0] / "config.yaml").read_text())["image_size"] == 8
    own = tmp_path / "mine.yaml"
    own.write_text(f"out: {tmp_path / 'Y'}\nepochs: 3\n")
    assert resolve_config(config_file=own).out == str(tmp_path / "Y")


def test_a_pre_header_run_config_is_recognised_by_the_files_beside_it(tmp_path, caplog):
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").write_text(f"out: {run}\noverwrite: true\nepochs: 4\n")
    with caplog.at_level(logging.WARNING, logger="vggkit"):
        config = resolve_config(config_file=run / "config.yaml")
    assert config.out is None and config.overwrite is False and config.epochs == 4


def test_overwrite_removes_only_the_files_vggkit_writes(tmp_path):
    run = tmp_path / "X"
    assert train("--out", str(run), "--epochs", "1") == 0
    mine = run / "checkpoints" / "epoch10-by-hand.safetensors"
    mine.write_bytes(b"the user's")
    notes = run / "notes.txt"
    notes.write_text("mine")
    assert train("--out", str(run), "--overwrite", "--epochs", "1") == 0
    assert mine.read_bytes() == b"the user's" and notes.read_text() == "mine"
    assert len(read_metrics(run / "metrics.jsonl")) == 1


def test_resume_of_a_run_killed_before_its_first_checkpoint_trains_it_from_the_start(tmp_path):
    run = tmp_path / "X"
    assert train("--out", str(run), "--epochs", "1") == 0
    (run / "checkpoints" / "last.safetensors").unlink()
    (run / "checkpoints" / "best.safetensors").unlink(missing_ok=True)
    (run / "summary.json").unlink()  # as a kill in the first epoch leaves it: config + metrics
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert (run / "checkpoints" / "last.safetensors").is_file() and (run / "summary.json").is_file()


def test_resuming_an_early_stopped_run_says_so_and_trains_only_when_told(tmp_path, capsys, monkeypatch):
    from vggkit.training.trainer import Trainer

    run = tmp_path / "X"
    # validation accuracy that never improves after epoch 1: --early-stop 1 stops at epoch 2
    monkeypatch.setattr(Trainer, "evaluate_sharded", lambda self, loader: (1.0, 0.5))
    assert train("--out", str(run), "--epochs", "5", "--early-stop", "1") == 0
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "stopped early at epoch 2 of 5" in capsys.readouterr().err
    assert len(read_metrics(run / "metrics.jsonl")) == 2  # no epoch 3
    assert main(["train", "--resume", str(run), "--early-stop", "10"]) == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_mid_epoch_resume_under_another_number_of_processes_is_refused():
    check_world_size({"epoch": 3, "batch": 0, "world_size": 2}, 1, "X")  # epoch boundary: fine
    check_world_size({"epoch": 3, "batch": 7, "world_size": 2}, 2, "X")
    with pytest.raises(UsageError, match=r"--resume X: it stopped mid-epoch \(epoch 4, batch 7\) "
                                         r"under 2 process\(es\); resume it with 2, not 1"):
        check_world_size({"epoch": 3, "batch": 7, "world_size": 2}, 1, "X")


def test_auto_precision_takes_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    cuda = torch.device("cuda")
    t4 = lambda including_emulation=True: including_emulation  # noqa: E731  (a T4 / V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    chosen, why = resolve_precision("auto", cuda)
    assert chosen == "fp16" and "loss scaling" in why
    with pytest.raises(UsageError, match="no native bf16"):
        resolve_precision("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", cuda)[0] == "bf16"  # an A100 / H100


def test_sync_bn_on_cpu_is_a_one_line_usage_error(tmp_path, capsys):
    assert train("--sync-bn", "--epochs", "1", "--out", str(tmp_path / "X")) == 2
    err = capsys.readouterr().err
    assert "--sync-bn: SyncBatchNorm needs CUDA devices" in err and "Traceback" not in err


def test_the_loss_scale_is_checkpointed_and_an_fp16_resume_continues_it(tmp_path, monkeypatch):
    """The fp16 path's GradScaler, on CPU: growing every step, its scale tells how many steps
    it has seen; a resumed run must end with the scale of the uninterrupted one."""
    from vggkit.training import engine as E
    from vggkit.training.checkpoint import load_checkpoint

    monkeypatch.setattr(E.Engine, "make_scaler", lambda self: torch.amp.GradScaler(
        "cpu", init_scale=2.0 ** 4, growth_interval=1))
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert train("--out", str(straight), "--epochs", "2") == 0
    assert train("--out", str(pieces), "--epochs", "1") == 0
    assert main(["train", "--resume", str(pieces), "--epochs", "2"]) == 0
    scale = lambda run: load_checkpoint(run / "checkpoints" / "last.safetensors").meta["scaler"]["scale"]  # noqa: E731
    assert scale(straight) == scale(pieces) > 2.0 ** 5


def test_evaluate_checks_the_tta_shift_and_defaults_to_the_runs_precision(tmp_path, capsys):
    from vggkit.evaluation import evaluate

    run = tmp_path / "X"
    assert train("--out", str(run), "--epochs", "1") == 0  # fp32, 8x8 images
    assert main(["evaluate", str(run), "--tta", "--tta-translate", "40"]) == 2
    err = capsys.readouterr().err
    assert "--tta-translate 40: must be smaller than the image side 8" in err and "Traceback" not in err
    result = evaluate(run)
    assert result["precision"] == "fp32"
    assert result["top1"] == json.loads((run / "summary.json").read_text())["test_acc"]


@pytest.mark.parametrize("device, backend", [("cuda", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_the_process_group_serves_the_cpu_tensors_of_a_gpu_run(monkeypatch, device, backend):
    """Under torchrun on GPUs the epoch's sums are CPU tensors, which NCCL alone cannot
    reduce: the group pairs NCCL (CUDA tensors) with gloo (CPU ones). CUDA calls mocked."""
    from vggkit.training import distributed as D

    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(D.dist, "init_process_group",
                        lambda backend, **kw: started.setdefault("backend", backend))
    info = D.init_distributed(torch.device(device))
    assert info.enabled and started["backend"] == backend


def test_uniform_non_square_images_get_one_square_side_from_both_sides(tmp_path, capsys):
    """Every image 64x48: training, the checkpoint, evaluate and predict all use one square
    side (the shorter side, as for mixed sizes), where the width alone used to decide and the
    run ended in a matmul traceback."""
    from vggkit.data import load_dataset
    from vggkit.data.crops import native_side
    from vggkit.data.testing import write_image_folder
    from vggkit.training.checkpoint import load_checkpoint

    write_image_folder(tmp_path / "wide", classes=("a", "b"), per_class=12, test_per_class=4,
                       size=(64, 48))
    run = tmp_path / "run"
    assert main(["train", "--model", "vgg_compact", "--dataset", f"folder:{tmp_path / 'wide'}",
                 "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8",
                 "--precision", "fp32", "--no-report", "--out", str(run)]) == 0
    assert "every image is 64x48, not square; training at 48x48" in capsys.readouterr().err
    shape = load_checkpoint(run / "checkpoints" / "last.safetensors").meta["image_shape"]
    assert shape == [3, 48, 48]
    summary = json.loads((run / "summary.json").read_text())
    assert main(["evaluate", str(run), "--json", "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(summary["test_acc"])
    assert main(["predict", str(run), str(tmp_path / "wide" / "test" / "b" / "0000.png")]) == 0
    # frames larger than a network takes (1920x1080; here 1300x1100) come down to at most 224
    write_image_folder(tmp_path / "frames", classes=("a", "b"), per_class=1, test_per_class=1,
                       size=(1300, 1100))
    frames = load_dataset(f"folder:{tmp_path / 'frames'}", data_dir=str(tmp_path / "data"),
                          download=False)
    assert tuple(frames.x_train.shape[2:]) == (1100, 1300)  # read back as they are ...
    assert native_side(frames) == (224, False)  # ... and trained at 224x224
