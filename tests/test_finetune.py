"""Fine-tuning controls (issue 28): --freeze-features, --freeze-epochs, --features-lr-scale:
no gradient through frozen features (the engine's fast convolutions included), their weights
and BatchNorm statistics untouched, the unfreeze at an epoch boundary, resume exactness across
it, the features' learning-rate factor at every step, and the usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from interrupt import interrupted_run
from vggkit.cli import main
from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.models import create_model
from vggkit.runfolder import read_metrics
from vggkit.training import engine as E
from vggkit.training import trainer as T
from vggkit.training.checkpoint import load_checkpoint
from vggkit.training.distributed import DistInfo
from vggkit.training.finetune import FeatureFreeze, freeze_features
from vggkit.training.trainer import StopFlag, Trainer
from vggkit.workflow import train

# vgg11_bn on digits at the default side (32): 64 training images in 4 batches of 16.
FT = dict(model="vgg11_bn", dataset="digits", batch_size=16, subset=64, val_split=40, lr=0.05,
          precision="fp32", report=False, threads=2)
STEPS = 4


def config(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**FT, "out": str(tmp_path / name), **kw})


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


def test_frozen_features_get_no_gradient_and_keep_weights_and_statistics(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=1, freeze_features=True), None, progress=False)
    model = trainer.model
    features, head = snapshot(model.features), snapshot(model.classifier)
    head_params = sum(p.numel() for p in model.classifier.parameters())
    assert trainer.params["trainable"] == head_params  # what summary.json records
    assert trainer.params["total"] == trainer.params["trainable"] + trainer.params["non_trainable"]
    trainer.train_epoch(0, StopFlag())
    assert model.training and norms(model.features)
    assert not any(m.training for m in norms(model.features))  # eval mode inside train mode
    # the last step's gradients: none for the features, all for the head
    assert all(p.grad is None for p in model.features.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    assert changed(features, model.features) == []  # weights, running_mean/var, counters
    assert changed(head, model.classifier)
    images, _ = next(iter(trainer.data.train.epoch(0)))
    assert model.features(images).grad_fn is None  # nothing recorded: no backward to run


def test_freeze_epochs_train_the_head_first_then_everything(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=2, freeze_epochs=1), None, progress=False)
    model, opt = trainer.model, trainer.optimizer
    start = snapshot(model.features)
    trainer.train_epoch(0, StopFlag())
    assert changed(start, model.features) == []
    assert not any(opt.state.get(p) for p in model.features.parameters())  # no momentum yet
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.features.parameters()} <= held  # it holds them all the same
    trainer.train_epoch(1, StopFlag())
    moved = changed(start, model.features)
    assert any(k.endswith("running_mean") for k in moved)
    assert any(k.endswith(".weight") and "running" not in k for k in moved)
    assert all(m.training for m in norms(model.features))
    assert all(p.requires_grad and p.grad is not None for p in model.features.parameters())
    assert type(model.features) is nn.Sequential


def test_an_unfreeze_keeps_parameters_frozen_by_design():
    model = create_model("vgg_airbench", num_classes=10, in_channels=3, input_size=32)
    by_design = {n for n, p in model.features.named_parameters() if not p.requires_grad}
    assert by_design  # the whitening stem's weight
    freeze = FeatureFreeze(model, epochs=1)
    assert freeze.apply(0) and not any(p.requires_grad for p in model.features.parameters())
    assert not freeze.apply(1)
    assert {n for n, p in model.features.named_parameters() if not p.requires_grad} == by_design


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train(config(out, epochs=3, freeze_epochs=1), progress=False)
    return out / "run"


@pytest.mark.parametrize("stop_after", [STEPS, STEPS + 1],
                         ids=["last-frozen-step", "first-unfrozen-step"])
def test_resume_is_exact_across_the_unfreeze(tmp_path, monkeypatch, straight, stop_after):
    """3 epochs with --freeze-epochs 1 in one go == stopped at the unfreeze (after epoch 1's
    last step, or epoch 2's first), then --resume RUN --epochs 3."""
    interrupted_run(monkeypatch, config(tmp_path, "split", epochs=3, freeze_epochs=1), stop_after)
    summary = train(TrainConfig(resume=str(tmp_path / "split"), epochs=3), progress=False)
    assert summary["epochs_completed"] == 3
    a = load_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    losses = [r["train_loss"] for r in read_metrics(straight / "metrics.jsonl")]
    assert losses == [r["train_loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]


def test_features_lr_scale_holds_at_every_step(tmp_path, monkeypatch):
    """The features' groups run at 0.1x the scheduled (head's) rate after each set_lr, their
    BatchNorm at 0.1 x --norm-lr-scale."""
    trainer = Trainer(config(tmp_path, epochs=1, features_lr_scale=0.1, norm_lr_scale=2.0),
                      None, progress=False)
    model, opt = trainer.model, trainer.optimizer
    in_features = {id(p) for p in model.features.parameters()}
    in_norms = {id(p) for m in norms(model) for p in m.parameters()}
    seen = []
    real = T.TrainStep.__call__

    def record(self, *args):
        seen.append({id(p): g["lr"] for g in opt.param_groups for p in g["params"]})
        return real(self, *args)

    monkeypatch.setattr(T.TrainStep, "__call__", record)
    trainer.train_epoch(0, StopFlag())
    assert len(seen) == STEPS and len({lrs[id(model.classifier[0].weight)] for lrs in seen}) == STEPS
    for it, lrs in enumerate(seen):
        scheduled = trainer.schedule.lr_at(it)
        for p in model.parameters():
            factor = (0.1 if id(p) in in_features else 1.0) * (2.0 if id(p) in in_norms else 1.0)
            assert lrs[id(p)] == pytest.approx(factor * scheduled, rel=1e-12), (it, p.shape)
    assert opt.param_groups[0]["lr"] == pytest.approx(trainer.schedule.lr_at(STEPS - 1))


def _count_calls(monkeypatch, cls) -> dict[str, int]:
    calls = {"n": 0}
    real = cls.apply

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(cls, "apply", counted)
    return calls


def test_fast_convolutions_honour_frozen_features(monkeypatch):
    """CPU bf16: FastConv2d's own weight-gradient path runs for trainable small-map
    convolutions and never for frozen ones, which record no graph."""
    engine = E.make_engine("cpu", "bf16", channels_last=True, compile=False)
    calls = [_count_calls(monkeypatch, E._SmallMapConv3x3),
             _count_calls(monkeypatch, E._DenseSmallMapConv3x3)]
    x = engine.to_input(torch.randn(2, 3, 32, 32))
    for frozen in (False, True):
        torch.manual_seed(0)
        model = engine.prepare(create_model("vgg11_bn", num_classes=10, input_size=32))
        assert any(isinstance(m, E.FastConv2d) for m in model.modules())
        if frozen:
            freeze_features(model)
        model.train()
        for c in calls:
            c["n"] = 0
        with engine.autocast():
            out = model.features(x)
            loss = model.classifier(model.flatten(model.avgpool(out))).float().sum()
        loss.backward()
        if frozen:
            assert out.grad_fn is None and sum(c["n"] for c in calls) == 0
            assert all(p.grad is None for p in model.features.parameters())
        else:
            assert out.grad_fn is not None and sum(c["n"] for c in calls) > 0
            assert all(p.grad is not None for p in model.features.parameters())
        assert all(p.grad is not None for p in model.classifier.parameters())


def test_freeze_epochs_is_refused_under_torchrun_and_freeze_features_is_not():
    model = create_model("vgg11_bn", num_classes=10, input_size=32)
    two = DistInfo(rank=0, world_size=2)
    with pytest.raises(UsageError, match=r"^--freeze-epochs .*DistributedDataParallel"):
        FeatureFreeze.from_config(model, TrainConfig(model="vgg11_bn", freeze_epochs=1), two)
    FeatureFreeze.from_config(model, TrainConfig(model="vgg11_bn", freeze_features=True), two)
    assert not any(p.requires_grad for p in model.features.parameters())


@pytest.mark.parametrize("args, flag", [
    (["--features-lr-scale", "-0.1"], "--features-lr-scale"),
    (["--features-lr-scale", "0"], "--features-lr-scale"),
    (["--freeze-epochs", "-1"], "--freeze-epochs"),
    (["--freeze-epochs", "3", "--epochs", "3"], "--freeze-epochs"),
    (["--freeze-epochs", "1", "--freeze-features"], "--freeze-epochs"),
])
def test_bad_values_are_usage_errors_naming_the_flag(capsys, args, flag):
    assert main(["train", "--model", "vgg11_bn", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vggkit: error: {flag} "), err


def test_help_shows_the_fine_tuning_group(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "fine-tuning:" in out
    for flag in ("--freeze-features", "--freeze-epochs", "--features-lr-scale"):
        assert flag in out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_torchrun_frozen_features_train(tmp_path):
    """Two CPU processes (gloo): DDP leaves the frozen features out and the ranks agree (the
    refusal of --freeze-epochs there is tested without processes, below)."""
    from test_distributed import torchrun

    args = ["--model", "vgg_compact", "--image-size", "8", "--batch-size", "32", "--epochs", "1",
            "--precision", "fp32", "--no-report", "--no-health"]
    ok = torchrun([*args, "--freeze-features", "--out", str(tmp_path / "ddp")])
    _, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert len(set(summary["rank_weights_digests"])) == 1
    torch.manual_seed(0)  # the run's initial weights
    initial = create_model("vgg_compact", num_classes=10, in_channels=1, input_size=8)
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors").model_state
    for key, value in initial.features.state_dict().items():
        assert torch.equal(state[f"features.{key}"], value), key
