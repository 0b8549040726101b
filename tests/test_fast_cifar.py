"""The fast-cifar10 recipe (airbench94 in vggkit's engine): the vgg_airbench network, its
whitening stem, the triangle schedule, per-group rates, lookahead averaging, flip-and-translate
TTA, and a tiny end-to-end run with an exact mid-epoch resume. All on small data: seconds."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from interrupt import interrupted_run
from vggkit.config import TrainConfig, resolve_config
from vggkit.errors import UsageError
from vggkit.models import count_parameters, create_model
from vggkit.models.vgg import init_whitening, patch_covariance
from vggkit.recipes import list_recipes, load_recipe
from vggkit.training.checkpoint import load_checkpoint
from vggkit.training.engine import make_engine
from vggkit.training.optim import Lookahead, Schedule, build_optimizer, set_lr
from vggkit.runfolder import read_metrics
from vggkit.training.scoring import tta_logits
from vggkit.workflow import train


# ----------------------------------------------------------------------------- network
def test_parameter_count_is_airbench94s():
    """Stem 3->24 (2x2: 288 frozen weights + 24 bias), convs 24-64-64-256-256-256-256 without
    bias, six BatchNorms (frozen weight, trained bias), 256->10 dense without bias."""
    counts = count_parameters(create_model("vgg_airbench"))
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256)
    bn_channels = 64 + 64 + 256 * 4
    assert counts["trainable"] == 24 + convs + bn_channels + 256 * 10 == 1_971_352
    assert counts["non_trainable"] == 288 + bn_channels + 2 * bn_channels == 3_744
    assert counts["total"] == 1_975_096


def test_block_order_activation_and_batchnorm_options():
    model = create_model("vgg_airbench")
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:6] == ["Conv2d", "GELU", "Conv2d", "MaxPool2d", "BatchNorm2d", "GELU"]
    assert kinds[6:9] == ["Conv2d", "BatchNorm2d", "GELU"]
    assert kinds.count("MaxPool2d") == 3
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs[0].bias is not None and not convs[0].weight.requires_grad
    assert all(c.bias is None for c in convs[1:])
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert all(not b.weight.requires_grad and b.bias.requires_grad for b in bns)
    assert all(b.eps == 1e-12 and b.momentum == pytest.approx(0.4) for b in bns)
    # Identity ("dirac") initialisation of the first C_in filters of each 3x3 convolution.
    w = convs[2].weight  # 64 -> 256
    eye = torch.zeros(64, 64, 3, 3)
    eye[torch.arange(64), torch.arange(64), 1, 1] = 1
    assert torch.equal(w[:64], eye)
    assert isinstance(model.classifier[0], nn.Linear) and model.classifier[0].bias is None
    assert model.classifier[1].factor == pytest.approx(1 / 9)
    assert model.whitening is convs[0]
    assert create_model("vgg16_bn").whitening is None


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28), (3, 9), (3, 64)])
def test_output_shape_at_odd_sizes(channels, size):
    """32 -> 31 after the 2x2 stem -> 15 -> 7 -> 3 -> global max; other sides floor alike."""
    model = create_model("vgg_airbench", in_channels=channels, input_size=size,
                         num_classes=7).eval()
    assert model.features[0].out_channels == 2 * channels * 4
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_too_small_input_names_the_stem():
    with pytest.raises(UsageError, match=r"image size 8: vgg_airbench has a 2x2 whitening stem "
                                         r"and 3 2x2 max-pools.*at least 9"):
        create_model("vgg_airbench", input_size=8)


def test_flatten_head_on_the_airbench_stack_counts_the_floored_side():
    model = create_model("vgg_airbench", head="linear").eval()  # 256 x 3 x 3 -> 10
    assert model.classifier[0].in_features == 256 * 9
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------- whitening
def test_whitening_makes_patch_covariance_the_identity():
    """Correlated images (neighbouring pixels and channels alike): after init_whitening the
    first half of the stem's outputs (bias 0) has ~identity covariance over the patches, the
    second half is its negative, and the filters come largest-eigenvalue first."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200, 1, 20, 20, generator=gen)
    smooth = nn.functional.avg_pool2d(base, 3, 1, 1)
    images = torch.cat([smooth, 0.7 * smooth + 0.3 * torch.randn(200, 1, 20, 20, generator=gen),
                        torch.randn(200, 1, 20, 20, generator=gen)], 1)
    model = create_model("vgg_airbench", input_size=20)
    conv = model.whitening
    init_whitening(conv, images, eps=1e-6)
    with torch.no_grad():
        nn.init.zeros_(conv.bias)
        out = conv(images)  # (N, 24, 19, 19)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = half.T @ half / len(half)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(out[:, 12:], -out[:, :12])
    raw = patch_covariance(images, 2)
    assert raw.shape == (12, 12)
    norms = conv.weight[:12].flatten(1).norm(dim=1)  # 1 / sqrt(eigenvalue): ascending
    assert torch.all(norms[1:] >= norms[:-1] * (1 - 1e-4))


# ----------------------------------------------------------------------------- optimisation
def test_triangle_schedule_is_airbenchs():
    s = Schedule("triangle", 2.0, steps_per_epoch=48, epochs=10, triangle=(0.2, 0.23, 0.07))
    top = int(0.23 * 480)
    assert s.lr_at(0) == pytest.approx(0.4)
    assert s.lr_at(top) == pytest.approx(2.0)
    assert s.lr_at(top // 2) == pytest.approx(2.0 * (0.2 + 0.8 * (top // 2) / top))
    assert s.lr_at(480) == pytest.approx(0.14)
    assert s.lr_at(479) > s.lr_at(480)


def test_norm_parameters_get_scaled_rate_and_divided_decay():
    model = create_model("vgg_airbench")
    config = TrainConfig(model="vgg_airbench", lr=1.5, weight_decay=1e-3, norm_lr_scale=64.0,
                         decay_all=True)
    opt = build_optimizer(model, config, config.lr)
    norm = [g for g in opt.param_groups if g.get("lr_scale") == 64.0]
    assert len(norm) == 1 and len(norm[0]["params"]) == 6  # the six BatchNorm biases
    assert norm[0]["lr"] == pytest.approx(96.0)
    assert norm[0]["weight_decay"] == pytest.approx(1e-3 / 64)
    # decay_all: the stem bias is decayed with the weights; frozen tensors are left out.
    assert sum(len(g["params"]) for g in opt.param_groups) == 1 + 7 + 6
    assert all(g["weight_decay"] == pytest.approx(1e-3) for g in opt.param_groups
               if g is not norm[0])
    set_lr(opt, 0.5)
    assert norm[0]["lr"] == pytest.approx(32.0)
    assert all(g["lr"] == pytest.approx(0.5) for g in opt.param_groups if g is not norm[0])
    # two groups: the stem bias and the weights, decayed; the BatchNorm biases, scaled
    assert sorted(len(g["params"]) for g in opt.param_groups) == [6, 8]
    # The default keeps the historic two groups: weights decayed, biases and BN not.
    plain = build_optimizer(create_model("vgg11_bn"), TrainConfig(), 0.1)
    assert [g["weight_decay"] for g in plain.param_groups] == [5e-4, 0.0]


def test_lookahead_averages_and_copies_back_then_packs_into_the_optimizer_state():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    la = Lookahead(model, start=1, every=2, decay=0.5, power=1.0, total_steps=8)
    la.after_step(2, epoch=0)
    assert la.average is None  # before the start epoch
    la.after_step(3, epoch=1)
    assert la.average is None  # not a multiple of every
    la.after_step(4, epoch=1)  # first: copy only
    first = [t.clone() for t in la.average]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = model[0].weight.clone()
    la.after_step(6, epoch=1)
    rho = 0.5**2 * (6 / 8)
    expected = first[0].lerp(before, 1 - rho)
    assert torch.allclose(model[0].weight, expected) and torch.allclose(la.average[0], expected)
    # num_batches_tracked (an integer) takes no part; running stats do.
    assert len(la.average) == 2 + 2 + 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    packed = la.pack(opt.state_dict())
    other = Lookahead(model, start=1, every=2, decay=0.5, power=1.0, total_steps=8)
    plain = other.unpack(packed)
    assert all(k >= 0 for k in plain["state"])
    assert all(torch.equal(a, b) for a, b in zip(la.average, other.average))
    opt.load_state_dict(plain)


def test_tta_translate_weights_views_as_airbench():
    class Probe(nn.Module):  # logits = mean pixel of the top-left quadrant: shift-sensitive
        def forward(self, x):
            return torch.stack([x[:, :, :2, :2].mean((1, 2, 3)), x[:, :, :2, 2:].mean((1, 2, 3))], 1)

    engine = make_engine("cpu", "fp32", False, False)
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    got = tta_logits(Probe(), x, engine, translate=1)

    def mirror(v):
        return 0.5 * (Probe()(v) + Probe()(v.flip(-1)))

    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    want = 0.5 * mirror(x) + 0.25 * (mirror(padded[:, :, :4, :4]) + mirror(padded[:, :, 2:, 2:]))
    assert torch.allclose(got, want)
    assert torch.allclose(tta_logits(Probe(), x, engine), mirror(x))


# ----------------------------------------------------------------------------- recipe
def test_recipe_is_listed_and_valid():
    assert "fast-cifar10" in list_recipes()
    assert list_recipes()["fast-cifar10"].startswith("airbench94")
    raw = load_recipe("fast-cifar10")
    config = resolve_config(recipe="fast-cifar10")
    assert config.model == "vgg_airbench" and config.batch_size == 1024
    assert config.lookahead and config.tta and config.tta_translate == 1
    assert config.lr * (1 + 1 / (1 - config.momentum)) == pytest.approx(11.5)
    assert config.weight_decay * 11.5 == pytest.approx(0.0153)
    assert set(raw) <= set(config.to_dict())


# A tiny version of the recipe: digits at 12x12 (the stem makes it 11 -> 5 -> 2 -> 1), with
# lookahead and the stem-bias freeze moved early so that one short run exercises both.
TINY = dict(dataset="digits", image_size=12, subset=320, batch_size=64, epochs=2,
            lookahead_start=1, lookahead_every=2, whiten_bias_epochs=1, report=False,
            precision="fp32", eval_batch_size=256)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return resolve_config({**TINY, "out": str(tmp_path / name), **kw}, recipe="fast-cifar10")


def test_tiny_recipe_run_learns_and_reports(tmp_path):
    summary = train(tiny(tmp_path), progress=False)
    assert summary["tta"] and summary["tta_translate"] == 1
    assert summary["epochs_completed"] == 2
    assert summary["test_acc"] > 0.3 and summary["wall_seconds"] > 0  # 10 classes: learning
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_samples"] == 320 // 64 * 64 for r in rows)  # drop_last
    # the recipe trains on everything (--val-split 0): the per-epoch test curve is monitoring
    assert "val_acc" not in rows[-1] and rows[-1]["test_acc"] > 0.2  # 10 classes: learning
    assert summary["best_val_acc"] is None
    assert not (tmp_path / "run" / "checkpoints" / "best.safetensors").exists()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    # The stem: whitened from data (not the constructor's init), frozen; its bias trained
    # in epoch 1 only; the lookahead average rides in the optimizer state.
    fresh = create_model("vgg_airbench", input_size=12, in_channels=3)
    assert not torch.equal(ckpt.model_state["features.0.weight"], fresh.features[0].weight)
    assert any(int(k) < 0 for k in ckpt.optimizer_state["state"])


def test_mid_epoch_resume_with_lookahead_is_bit_for_bit(tmp_path, monkeypatch):
    train(tiny(tmp_path, "straight"), progress=False)
    # step 8: epoch 2, batch 3 (5 batches per epoch), with lookahead running
    interrupted_run(monkeypatch, tiny(tmp_path, "split"), 8)
    mid = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert (mid.meta["epoch"], mid.meta["batch"]) == (1, 3)
    assert any(int(k) < 0 for k in mid.optimizer_state["state"])
    train(TrainConfig(resume=str(tmp_path / "split")), progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
