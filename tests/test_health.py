"""Training health checks: crafted histories give the one finding each describes (and a
healthy history none); a plain VGG-11 that Adam at --lr 0.1 leaves at chance is reported as
such, the same net at 1e-3 is not; the probes measure what they say and leave no hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vggkit.data.testing import corner_images
from vggkit.models import create_model
from vggkit.training.health import (TARGET_STEP, BnGain, Finding, bn_gain_probe, check_bn_gain,
                                    check_bn_stats, check_epoch, dead_relu_probe, fresh,
                                    grad_norm, has_batchnorm, nice_rate, nonfinite_advice,
                                    plain_runs)

FACTS = dict(model_name="vgg16", has_batchnorm=False, optimizer="sgd", lr=0.1, num_classes=10)


def rows(*pairs: tuple[float, float], lr: float = 0.1) -> list[dict]:
    """metrics.jsonl records from (train_loss, train_acc) pairs."""
    return [{"epoch": i + 1, "train_loss": loss, "train_acc": acc, "val_loss": loss,
             "val_acc": acc, "lr": lr} for i, (loss, acc) in enumerate(pairs)]


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


HEALTHY = rows((2.0, 0.30), (1.5, 0.48), (1.2, 0.58), (1.0, 0.66), (0.9, 0.70))


def test_a_healthy_history_has_no_finding():
    assert check_epoch(HEALTHY, **FACTS, grad_norms=[3.0, 2.5, 2.0, 1.8, 1.7]) == []
    # a loss that has fit the data may stay flat, with tiny gradients
    fitted = rows((0.5, 0.9), (0.004, 1.0), (0.004, 1.0), (0.004, 1.0), (0.005, 1.0))
    assert check_epoch(fitted, **FACTS, grad_norms=[1.0, 1e-9]) == []
    assert check_epoch([], **FACTS) == []


def test_chance_accuracy_after_the_first_epoch_names_the_model_and_the_fix():
    stuck = rows((2.303, 0.101), (2.303, 0.099))
    assert check_epoch(stuck[:1], **FACTS) == []  # the first epoch is not judged
    (finding,) = check_epoch(stuck, **FACTS)
    assert finding.code == "chance" and finding.epoch == 2
    assert "9.9% is chance for 10 classes (10.0%)" in finding.message
    assert ("vgg16 has no BatchNorm; at --lr 0.1 it often stays at chance: try --lr 0.01 "
            "--warmup-epochs 2, or vgg16_bn") in finding.message
    assert str(finding).startswith("health (epoch 2): train accuracy")
    # 2 points away is no longer chance
    assert check_epoch(rows((2.3, 0.10), (2.2, 0.121)), **FACTS) == []

    adam = check_epoch(stuck, **{**FACTS, "optimizer": "adam", "lr": 0.01})
    assert "stuck with --optimizer adam --lr 0.01: try --lr 1e-3, or vgg16_bn" in adam[0].message
    bn = check_epoch(stuck, **{**FACTS, "model_name": "vgg16_bn", "has_batchnorm": True})
    assert "labels match the images" in bn[0].message and "BatchNorm;" not in bn[0].message
    low = check_epoch(stuck, **{**FACTS, "lr": 1e-5})
    assert "--lr 1e-05 may be too low" in low[0].message


def test_a_loss_that_stops_decreasing_is_reported_once_it_lasts():
    flat = rows((2.0, 0.3), (1.5, 0.5), (1.5, 0.5), (1.6, 0.49), (1.6, 0.5))
    assert codes(check_epoch(flat[:4], **FACTS)) == []  # 2 epochs flat: not yet
    (finding,) = check_epoch(flat, **FACTS)
    assert finding.code == "plateau" and "(1.5000 -> 1.6000)" in finding.message
    assert codes(check_epoch(flat[:4] + rows((1.4, 0.55)), **FACTS)) == []


def test_a_non_finite_loss_has_advice():
    diverged = rows((2.0, 0.3), (float("nan"), 0.1))
    found = check_epoch(diverged, **FACTS)
    assert codes(found)[0] == "nonfinite" and "train_loss and val_loss is nan" in found[0].message
    text = nonfinite_advice(**{k: v for k, v in FACTS.items() if k != "num_classes"},
                            precision="fp16")
    assert text == ("vgg16 diverged with --optimizer sgd --lr 0.1; try --lr 0.01, "
                    "--warmup-epochs 2, vgg16_bn or --precision bf16 or fp32")


@pytest.mark.parametrize("norms, code", [
    ([2.0, 5e3], "grad-explode"),  # above 1e3
    ([0.5, 80.0], "grad-explode"),  # 160x the first
    ([0.5, float("inf")], "grad-explode"),
    ([0.5, 40.0], None),  # 80x: not yet
    ([0.5, 1e-8], "grad-vanish"),  # while the loss is still high
])
def test_gradient_norms(norms, code):
    found = check_epoch(HEALTHY[:2], **FACTS, grad_norms=norms)
    assert codes(found) == ([code] if code else [])
    if code == "grad-explode" and math.isfinite(norms[-1]) and norms[-1] < 1e3:
        assert "160x the first (0.5)" in found[0].message


def test_dead_relu_layers_and_fresh_reports_each_kind_once():
    found = check_epoch(HEALTHY[:2], **FACTS, dead_relu_layers=[f"features.{i}" for i in
                                                                  (1, 3, 6, 8, 11)])
    assert codes(found) == ["dead-relu"]
    assert "5 ReLU layer(s) of vgg16 output only zeros on a batch (features.1, features.3, " \
           "features.6, features.8, ...)" in found[0].message
    seen: set[str] = set()
    assert fresh(found, seen) == found and fresh(found, seen) == []
    assert seen == {"dead-relu"}


def test_grad_norm_is_the_total_l2_norm_of_the_gradients():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))
    assert grad_norm(model) == 0.0  # no backward yet
    for p, value in zip(model.parameters(), (1.0, 2.0, 2.0)):
        p.grad = torch.full_like(p, value)
    expected = math.sqrt(6 * 1 + 2 * 4 + 2 * 4)
    assert grad_norm(model) == pytest.approx(expected)
    assert grad_norm(model, scale=4.0) == pytest.approx(expected / 4)


def test_dead_relu_probe_sees_a_dead_layer_on_the_first_batch_and_removes_its_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(inplace=True))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.fill_(-1.0)  # the second ReLU only ever sees negatives
    with dead_relu_probe(model) as probe:
        model(torch.randn(8, 4))
        with torch.no_grad():
            model[2].bias.fill_(1.0)  # a later batch does not count
        model(torch.randn(8, 4))
    assert probe.dead == ["3"]
    assert all(not m._forward_hooks for m in model.modules())
    assert has_batchnorm(create_model("vgg11_bn", num_classes=4, input_size=32))
    assert not has_batchnorm(create_model("vgg11", num_classes=4, input_size=32))


# ----------------------------------------------------------------------------- a real run
def tiny_run(optimizer_lr: float, epochs: int = 2, steps: int = 6, batch: int = 32):
    """A plain VGG-11 (no BatchNorm) trained with Adam on 32x32 corner images (the class
    is the corner of a bright square), as the trainer's loop would, with the checks
    called after each epoch. Returns the history and every finding."""
    torch.manual_seed(1)
    labels = torch.arange(epochs * steps * batch) % 4  # balanced batches
    images = torch.from_numpy(corner_images(labels.numpy(), seed=1).transpose(0, 3, 1, 2).copy())
    inputs = (images.float() / 255 - 0.3) / 0.3
    model = create_model("vgg11", num_classes=4, in_channels=3, input_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=optimizer_lr)
    history, norms, findings = [], [], []
    for epoch in range(epochs):
        loss_sum = correct = 0.0
        for step in range(steps):
            at = slice((epoch * steps + step) * batch, (epoch * steps + step + 1) * batch)
            optimizer.zero_grad()
            with dead_relu_probe(model) as probe:
                logits = model(inputs[at])
            loss = nn.functional.cross_entropy(logits, labels[at])
            loss.backward()
            norm = grad_norm(model)
            optimizer.step()
            loss_sum += loss.item() * batch
            correct += (logits.argmax(1) == labels[at]).sum().item()
        norms.append(norm)
        n = steps * batch
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n,
                        "val_loss": loss_sum / n, "val_acc": correct / n, "lr": optimizer_lr})
        findings += check_epoch(history, model_name="vgg11", has_batchnorm=False,
                                optimizer="adam", lr=optimizer_lr, num_classes=4,
                                grad_norms=norms, dead_relu_layers=probe.dead)
    return history, findings


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and quicker for a net this small
    yield
    torch.set_num_threads(threads)


def test_a_plain_vgg11_stuck_at_chance_is_reported_and_a_learning_one_is_not():
    history, findings = tiny_run(0.1)
    assert abs(history[-1]["train_acc"] - 0.25) <= 0.02, history  # precondition: stuck
    chance = [f for f in findings if f.code == "chance"]
    assert chance, findings
    assert "stuck with --optimizer adam --lr 0.1: try --lr 1e-3, or vgg11_bn" in chance[0].message

    history, findings = tiny_run(1e-3)
    assert history[-1]["train_acc"] > 0.6, history  # precondition: it learns
    assert findings == []


def test_a_stalled_run_reports_its_finding_in_the_summary(tmp_path):
    """Through the training loop: plain vgg11 under Adam at lr 0.1 does not learn, and the
    finding, with its advice, reaches summary.json; a healthy run has none."""
    from vggkit.config import TrainConfig
    from vggkit.workflow import train

    base = dict(model="vgg11", dataset="digits", image_size=32, subset=200, epochs=2,
                batch_size=50, precision="fp32", report=False, threads=1)
    stuck = train(TrainConfig(**base, optimizer="adam", lr=0.1, out=str(tmp_path / "stuck")),
                  progress=False)
    assert stuck["health"] and all(line.startswith("health (epoch ") for line in stuck["health"])
    assert "try --lr 1e-3" in stuck["health"][0]  # the advice for this optimizer and rate
    healthy = train(TrainConfig(**{**base, "model": "vgg_compact", "image_size": 8,
                                   "subset": None, "epochs": 3, "batch_size": 64},
                                out=str(tmp_path / "ok")), progress=False)
    assert healthy["test_acc"] > 0.5
    assert healthy["health"] == []


# ----------------------------------------------------------------------------- BatchNorm gain
def test_a_batchnorm_that_amplifies_plain_layers_names_the_rate_that_makes_their_step_small():
    history = rows((2.0, 0.2), (1.9, 0.25))
    amplified = BnGain("classifier.0", input_std=0.014, plain_layers=16, median_step=0.12)
    found = check_epoch(history, **FACTS, bn_gains=[amplified])
    gain = [f for f in found if f.code == "bn-gain"]
    assert len(gain) == 1
    assert ("BatchNorm classifier.0, after 16 layers without BatchNorm, divides an input of std "
            "0.014: it scales their gradients up ~71x") in gain[0].message
    assert "moves them by 12% of their weights" in gain[0].message
    # 0.1 * 0.004 / 0.12 = 0.0033, to the nearest 1-2-5 rate
    assert "Try --lr 0.005, which makes that step ~0.4%" in gain[0].message
    # a gain on a short plain run, a small gain, a small step, or Adam: no finding
    for quiet in (BnGain("b", 0.014, 1, 0.12), BnGain("b", 0.2, 16, 0.12),
                  BnGain("b", 0.014, 16, 0.009)):
        assert "bn-gain" not in codes(check_epoch(history, **FACTS, bn_gains=[quiet]))
    adam = {**FACTS, "optimizer": "adam"}
    assert "bn-gain" not in codes(check_epoch(history, **adam, bn_gains=[amplified]))
    assert [nice_rate(x) for x in (0.00095, 0.0013, 0.0083, 0.02, 0.35, 1e-4)] == [
        0.001, 0.001, 0.01, 0.02, 0.5, 1e-4]


def test_a_gain_behind_the_convolutions_names_the_features_rate_and_keeps_the_head_rate():
    """VGG-19's BatchNorm head as measured on the CIFAR-10 zip (std 0.0097, a 2.1% step at
    --lr 0.01): slow the 16 convolutions 5x, which trained best in the probes."""
    history = rows((2.0, 0.2), (1.9, 0.25))
    measured = BnGain("classifier.0", 0.0097, 16, 0.021, in_features=True)
    [gain] = [f for f in check_epoch(history, **{**FACTS, "lr": 0.01}, bn_gains=[measured])
              if f.code == "bn-gain"]
    assert "so at --lr 0.01 each step moves them by 2%" in gain.message
    assert ("Try --features-lr-scale 0.2 (the convolutions at 0.002, the head keeps --lr 0.01), "
            "which makes that step ~0.4%, and --precise-bn 5120") in gain.message
    # already scaled, but not enough: the step is at that scale, the advice the scale it needs
    half = BnGain("classifier.0", 0.0097, 16, 0.0105, in_features=True, features_lr_scale=0.5)
    message = check_bn_gain([half], 0.01, 1).message
    assert "at --lr 0.01 x 0.5 (--features-lr-scale) each step moves them by 1%" in message
    assert "Try --features-lr-scale 0.2 (" in message
    # the split recipe's own step (0.4%) is small: nothing to say
    assert check_bn_gain([BnGain("classifier.0", 0.0097, 16, 0.0042, True, 0.2)], 0.01, 1) is None


def test_the_gain_probe_steps_the_features_at_their_own_scale():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(4)])
            self.classifier = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 2))

        def forward(self, x):
            return self.classifier(self.features(x))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 8)
    measured = []
    for scale in (1.0, 0.2):
        model.zero_grad()
        with bn_gain_probe(model, lr=0.1, momentum=0.9, features_lr_scale=scale) as gains:
            model(x).square().mean().backward()
        measured.append(gains[0])
    full, slow = measured
    assert full.in_features and slow.in_features and slow.features_lr_scale == 0.2
    assert slow.median_step == pytest.approx(0.2 * full.median_step, rel=1e-6)


def test_plain_runs_find_the_head_batchnorm_after_the_sixteen_convolutions_of_vgg19():
    runs = plain_runs(create_model("vgg19", num_classes=10, input_size=32, head="bn"))
    first = next(iter(runs))
    assert len(runs[first]) == 16 and all(w.startswith("features.") for w in runs[first])
    assert all(len(run) == 1 for name, run in runs.items() if name != first)  # dense, BN, ...
    assert all(len(run) <= 1 for run in plain_runs(create_model(
        "vgg16_bn", num_classes=10, input_size=32)).values())


def test_the_gain_probe_measures_the_input_std_and_the_relative_step_and_leaves_no_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(4)], nn.BatchNorm1d(8))
    for layer in model[:4]:
        nn.init.eye_(layer.weight)
        layer.weight.data *= 0.5  # four layers of 0.5: the BatchNorm sees 1/16 of the input
    x = torch.randn(256, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with bn_gain_probe(model, lr=0.1, momentum=0.9) as gains:
        model(x).pow(3).mean().backward()
        expected = [0.1 * float(layer.weight.grad.norm() / layer.weight.detach().norm()) / 0.1
                    for layer in model[:4]]
        optimizer.step()  # moves the weights a little: the probe reads them after, as in a run
    assert len(gains) == 1 and gains[0].layer == "4" and gains[0].plain_layers == 4
    assert gains[0].input_std == pytest.approx(float(x.std()) / 16, rel=1e-5)
    assert gains[0].median_step == pytest.approx(sorted(expected)[2], rel=0.05)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_the_faithful_vgg19_bn_head_recipe_is_told_the_rate_that_trains_it(tmp_path):
    """Through the training loop, VGG-19 with the BatchNorm head on its own recipe (--lr 0.01)
    gets the bn-gain finding, naming a features rate at least 2x lower; at --lr 0.001 it gets
    none. (On the real CIFAR-10 zip the first step measures std 0.0097 and a 2.1% step, and the
    advice is --features-lr-scale 0.2, the split of the recipe that trains it.)"""
    from vggkit.config import resolve_config
    from vggkit.data import testing as T
    from vggkit.workflow import train

    T.write_cifar(tmp_path / "data", "cifar10", n_per_batch=20, n_test=20)
    flags = dict(data_dir=str(tmp_path / "data"), epochs=1, batch_size=50, val_split=20,
                 report=False, threads=1)
    faithful = train(resolve_config({**flags, "out": str(tmp_path / "a")},
                                    recipe="vgg19-bn-head-cifar10"), progress=False)
    gain = [line for line in faithful["health"] if "layers without BatchNorm" in line]
    assert gain and "after 16 layers without BatchNorm" in gain[0], faithful["health"]
    import re

    # the 16 layers are the convolutions: the advice slows them alone, the head keeps 0.01
    step, scale = re.search(r"by (\d+)% of their.*Try --features-lr-scale ([0-9.e-]+) \(",
                            gain[0]).groups()
    assert float(scale) == nice_rate(TARGET_STEP / (float(step) / 100)) <= 0.5, gain[0]
    assert "the head keeps --lr 0.01)" in gain[0]
    fixed = train(resolve_config({**flags, "out": str(tmp_path / "b"), "lr": 0.001},
                                 recipe="vgg19-bn-head-cifar10"), progress=False)
    assert not [line for line in fixed["health"] if "layers without" in line], fixed["health"]


# ----------------------------------------------------------------------------- BatchNorm statistics
def test_stale_batchnorm_statistics_are_told_to_use_precise_bn():
    found = check_bn_stats(0.04, 0.52, 5120, 1)  # VGG-19's BatchNorm head, measured
    assert found.code == "bn-stats" and "Try --precise-bn 5120" in found.message
    assert "4.0% with the BatchNorm running statistics and 52.0%" in found.message
    assert check_bn_stats(0.50, 0.53, 5120, 1) is None  # within noise: nothing to say


def test_the_bn_statistics_probe_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """The probe after epoch 1 computes the statistics again, validates, and puts the running
    ones back: the checkpoint, buffers included, is the same bits as a run without health."""
    from vggkit.config import TrainConfig
    from vggkit.training import trainer as trainer_module
    from vggkit.training.checkpoint import load_checkpoint
    from vggkit.workflow import train

    tiny = dict(model="vgg_compact", dataset="digits", image_size=16, batch_size=64, lr=0.05,
                report=False, precision="fp32", threads=1, epochs=2)
    monkeypatch.setattr(trainer_module, "BN_PROBE_MIN_STEPS", 1)  # the tiny run has few
    train(TrainConfig(**tiny, out=str(tmp_path / "a")), progress=False)
    train(TrainConfig(**tiny, out=str(tmp_path / "b"), health=False), progress=False)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors").model_state
    assert any("running_mean" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
