"""--precise-bn (detectron2's PreciseBN): before each evaluation, every BatchNorm's running
statistics are the plain average over fixed training images seen as evaluation sees them
(dropout off, no augmentation); training itself is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training.checkpoint import load_checkpoint
from vggkit.data.store import sample_positions
from vggkit.training.precise_bn import recompute_bn_stats
from vggkit.workflow import train

TINY = dict(model="vgg_compact", dataset="digits", image_size=16, batch_size=64, lr=0.05,
            report=False, precision="fp32", threads=1, epochs=2)


def test_the_statistics_are_the_average_over_the_batches_with_dropout_off():
    """Dropout then BatchNorm (VGG-19's BatchNorm head): the recomputed mean is the mean of
    the inputs themselves, not of their dropped-out copies; the variance is the average of the
    batches' unbiased variances; the momentum and every module's mode come back."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.01)
    model = nn.Sequential(nn.Dropout(0.5), bn)
    model.train()
    batches = [torch.randn(32, 3) * torch.tensor([1.0, 2.0, 0.5]) + 3 for _ in range(4)]
    assert recompute_bn_stats(model, iter(batches)) == 128
    mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    var = torch.stack([b.var(0) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.01 and model.training and model[0].training and bn.training


def test_a_network_left_with_stale_statistics_is_evaluated_on_fresh_ones():
    """Running statistics far from the data (as VGG-19's BatchNorm head ends its epochs)
    give eval outputs far from the batch's own normalisation; recomputed, they agree."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(256, 4)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(0.01)
        model.train()
        want = model(x)  # batch statistics of the whole set
        model.eval()
        assert not torch.allclose(model(x), want, atol=1e-2)
    recompute_bn_stats(model, iter([x]))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=5e-3)  # the running variance is unbiased


def test_the_images_are_drawn_across_the_training_set():
    """A folder's images come sorted by class: the first N would be one class."""
    pos = sample_positions(1000, 100, seed=0)
    assert len(pos) == 100 == len(set(pos.tolist())) and list(pos) == sorted(pos)
    assert pos.max() > 900 and pos.min() < 100
    assert (sample_positions(1000, 100, seed=0) == pos).all()
    assert len(sample_positions(50, 100, seed=0)) == 50  # all of them when there are fewer


def test_a_run_with_precise_bn_trains_the_same_weights_and_is_evaluated_on_new_statistics(
        tmp_path):
    plain = train(TrainConfig(**TINY, out=str(tmp_path / "a")), progress=False)
    precise = train(TrainConfig(**TINY, out=str(tmp_path / "b"), precise_bn=256), progress=False)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors").model_state
    stats = [k for k in a if "running_" in k]
    assert stats and a.keys() == b.keys()
    for key in a:
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(a[key], b[key]), key  # the same path: no random number drawn
    assert not all(torch.equal(a[k], b[k]) for k in stats)
    assert precise["test_acc"] > 0.5 and plain["test_acc"] > 0.5  # 10 classes: chance 10%


def test_the_final_test_reuses_the_last_epochs_statistics_and_a_resume_computes_them(
        tmp_path, monkeypatch):
    """One pass over the N images per evaluation: the final test follows the last epoch's
    evaluation with the same weights, so it does not pass again; a resumed finished run, whose
    process computed nothing yet, does."""
    from vggkit.training import trainer as trainer_module
    passes = []
    real = trainer_module.recompute_bn_stats
    monkeypatch.setattr(trainer_module, "recompute_bn_stats",
                        lambda *a, **k: passes.append(1) or real(*a, **k))
    out = tmp_path / "run"
    config = dict(TINY, health=False)
    train(TrainConfig(**config, out=str(out), precise_bn=256), progress=False)
    assert len(passes) == config["epochs"]  # one per epoch's evaluation, none for the test
    passes.clear()
    again = train(TrainConfig(resume=str(out)), progress=False)
    assert len(passes) == 1 and again["test_acc"] > 0.5


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_count_is_refused_naming_the_flag(value):
    from vggkit.config import apply_overrides

    with pytest.raises(UsageError, match="--precise-bn"):
        apply_overrides(TrainConfig(), {"precise_bn": value}, source="command line")


def test_frozen_features_keep_their_statistics():
    """--freeze-features keeps the features' BatchNorm statistics (Keras's trainable=False):
    only the head's are computed again."""
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                               nn.Flatten()))
    model.add_module("classifier", nn.Sequential(nn.Linear(4 * 36, 5), nn.BatchNorm1d(5)))
    before = model.features[1].running_mean.clone()
    recompute_bn_stats(model, iter([torch.randn(16, 3, 8, 8) + 2]), keep=("features",))
    assert torch.equal(model.features[1].running_mean, before)
    assert not torch.equal(model.classifier[1].running_mean, torch.zeros(5))
