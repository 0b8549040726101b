"""The regularisers timm users expect (issue 29): --ema, --mixup/--cutmix and --auto-augment,
each checked against what its paper (or Pillow, for the image operations) says it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

from interrupt import interrupted_run
from vggkit.cli import main
from vggkit.config import TrainConfig
from vggkit.data import autoaugment as AA
from vggkit.data.loader import Augment, Loader
from vggkit.training.checkpoint import load_checkpoint, model_from_checkpoint
from vggkit.training.ema import WeightEMA
from vggkit.training.engine import TrainStep, make_engine
from vggkit.training.mixing import Mix, Mixing
from vggkit.training.trainer import weights_digest
from vggkit.workflow import train

TINY = dict(model="vgg_compact", dataset="digits", image_size=16, batch_size=64, lr=0.05,
            report=False, precision="fp32", threads=1, crop_padding=1)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


# ----------------------------------------------------------------------------- EMA
def test_ema_equals_its_closed_form_after_k_steps():
    """ema_k = d^k w_0 + sum_i (1 - d) d^(k-i) w_i, for weights and BatchNorm statistics;
    the batch counter is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    d, k = 0.8, 6
    ema = WeightEMA(model, d)
    seen = [{n: v.clone() for n, v in model.state_dict().items()}]
    for step in range(1, k + 1):
        with torch.no_grad():
            for v in model.state_dict().values():
                v.copy_(torch.randn_like(v.float()) if v.is_floating_point() else v + 1)
        ema.update(step)
        seen.append({n: v.clone() for n, v in model.state_dict().items()})
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        closed = d**k * seen[0][name] + sum((1 - d) * d ** (k - i) * seen[i][name]
                                            for i in range(1, k + 1))
        assert torch.allclose(ema.state_dict()[name], closed, atol=1e-6), name
    assert ema.state_dict()["1.num_batches_tracked"] == seen[-1]["1.num_batches_tracked"]
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_is_timms():
    ema = WeightEMA(nn.Linear(2, 2), 0.9998, warmup=True)
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(100) == pytest.approx(1 - 101 ** (-2 / 3))
    assert ema.decay_at(10**9) == 0.9998
    assert WeightEMA(nn.Linear(2, 2), 0.99).decay_at(1) == 0.99


def test_a_run_with_every_regulariser_learns_and_tests_and_saves_the_average(tmp_path):
    summary = train(tiny(tmp_path, epochs=4, ema=0.9, ema_warmup=True, mixup=0.2,
                         auto_augment="rand-m5-n1"), progress=False)
    assert summary["test_acc"] > 0.6  # 10 classes: chance is 10%
    run = tmp_path / "run"
    last = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert last.training_state.keys() == last.model_state.keys()
    key = "features.0.weight"
    assert not torch.equal(last.training_state[key], last.model_state[key])
    model, _ = model_from_checkpoint(run, "last")
    assert summary["weights_digest"] == weights_digest(model)  # the final test is the average's
    best = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert not best.training_state  # the selected weights alone: the average


def test_resume_is_exact_with_ema_mixing_and_auto_augment(tmp_path, monkeypatch):
    """Stopped mid-epoch 2 and resumed == never stopped: the average, the trained weights."""
    extra = dict(epochs=2, ema=0.95, ema_warmup=True, mixup=0.4, cutmix=1.0,
                 auto_augment="trivial")
    train(tiny(tmp_path, "straight", **extra), progress=False)
    interrupted_run(monkeypatch, tiny(tmp_path, "split", **extra), 25)  # 20 batches an epoch
    train(TrainConfig(resume=str(tmp_path / "split")), progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    for state in ("model_state", "training_state"):
        for name, value in getattr(a, state).items():
            assert torch.equal(value, getattr(b, state)[name]), (state, name)


# ----------------------------------------------------------------------------- mixup / cutmix
def batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def test_mixup_blends_each_image_with_its_reversed_partner():
    x, y = batch()
    mixing = Mixing(mixup=0.4, seed=3)
    kind, lam, _ = mixing.draw(7, 6, 6)
    out, mix = mixing(x.clone(), y, 7)
    assert kind == "mixup" and mix.lam == lam and 0 < lam < 1
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.equal(mix.partner, y.flip(0))


def test_cutmix_pastes_a_box_of_one_minus_lam_of_the_image():
    x, y = batch(seed=1)
    mixing = Mixing(cutmix=1.0, seed=5)
    for step in range(20):
        kind, lam, (y0, y1, x0, x1) = mixing.draw(step, 6, 6)
        out, mix = mixing(x.clone(), y, step)
        assert kind == "cutmix" and mix.lam == lam
        inside = torch.zeros(6, 6, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[:, :, inside], x.flip(0)[:, :, inside])
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
        assert lam == pytest.approx(1 - inside.float().mean().item())


def test_mixed_loss_is_the_cross_entropy_of_soft_targets_that_sum_to_one():
    """lam CE(y) + (1 - lam) CE(partner) == CE against lam onehot(y) + (1 - lam) onehot(partner),
    each smoothed; and --grad-accum gives the same update."""
    x, y = batch(16)
    x = x.flatten(1)
    lam, smoothing, classes = 0.3, 0.1, 5
    mix = Mix(y.flip(0), lam)
    engine = make_engine("cpu", "fp32", False, False)

    def stepped(accumulate):
        torch.manual_seed(0)
        model = nn.Linear(x.shape[1], classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
        loss, _ = TrainStep(model, opt, loss_fn, engine, accumulate)(x, y, mix)
        return model, loss

    torch.manual_seed(0)
    ref = nn.Linear(x.shape[1], classes)
    soft = lambda t: F.one_hot(t, classes) * (1 - smoothing) + smoothing / classes  # noqa: E731
    target = lam * soft(y) + (1 - lam) * soft(mix.partner)
    assert torch.allclose(target.sum(1), torch.ones(16))
    expected = F.cross_entropy(ref(x), target)
    expected.backward()
    with torch.no_grad():
        ref.weight -= 0.5 * ref.weight.grad
    model, loss = stepped(1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(model.weight, ref.weight, atol=1e-6)
    chunked, _ = stepped(4)
    assert torch.allclose(chunked.weight, ref.weight, atol=1e-6)


def test_mix_draws_follow_beta_and_the_switch_and_mix_probabilities():
    mixing = Mixing(mixup=1.0, cutmix=1.0, prob=0.6, switch_prob=0.3, seed=0)
    draws = [mixing.draw(step, 32, 32) for step in range(4000)]
    kinds = [k for k, _, _ in draws]
    assert kinds.count("none") / 4000 == pytest.approx(0.4, abs=0.03)
    mixed = [k for k in kinds if k != "none"]
    assert mixed.count("cutmix") / len(mixed) == pytest.approx(0.3, abs=0.03)
    lams = np.array([lam for k, lam, _ in draws if k == "mixup"])  # Beta(1, 1): uniform
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / 12, abs=0.01)
    assert mixing.draw(11, 32, 32) == mixing.draw(11, 32, 32)  # a function of the step
    other_rank = Mixing(mixup=1.0, cutmix=1.0, prob=0.6, switch_prob=0.3, seed=0, rank=1)
    assert [other_rank.draw(s, 32, 32) for s in range(20)] != draws[:20]


# ----------------------------------------------------------------------------- auto-augment
def image(seed=0, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (size, size, 3))  # a smooth-ish picture with some texture
    return np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def ours(op: str, array: np.ndarray, magnitude: float) -> np.ndarray:
    x = torch.from_numpy(array).permute(2, 0, 1)[None]
    ops = torch.tensor([[AA.OPS.index(op)]])
    out = AA.apply(x, ops, torch.tensor([[magnitude]]))
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("op,magnitude,pillow,tolerance", [
    ("brightness", 0.4, lambda im: ImageEnhance.Brightness(im).enhance(1.4), 1),
    ("brightness", -0.5, lambda im: ImageEnhance.Brightness(im).enhance(0.5), 1),
    ("color", 0.7, lambda im: ImageEnhance.Color(im).enhance(1.7), 2),
    ("contrast", -0.6, lambda im: ImageEnhance.Contrast(im).enhance(0.4), 2),
    ("contrast", 0.5, lambda im: ImageEnhance.Contrast(im).enhance(1.5), 2),
    ("sharpness", 0.9, lambda im: ImageEnhance.Sharpness(im).enhance(1.9), 2),
    ("posterize", 3, lambda im: ImageOps.posterize(im, 3), 0),
    ("solarize", 128, lambda im: ImageOps.solarize(im, 128), 0),
    ("autocontrast", 0, ImageOps.autocontrast, 1),
    ("equalize", 0, ImageOps.equalize, 0),
    ("shear_x", 0.37, lambda im: im.transform(im.size, Image.AFFINE, (1, 0.37, 0, 0, 1, 0),
                                               Image.NEAREST), 0),
    ("translate_y", 3, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -3),
                                                Image.NEAREST), 0),
])
def test_each_operation_matches_pillow(op, magnitude, pillow, tolerance):
    """The operations of the papers' (PIL-based) implementations, here on whole batches."""
    array = image(1)
    if op == "autocontrast":
        array = (array * 0.5 + 40).astype(np.uint8)  # a narrow range to stretch
    expected = np.asarray(pillow(Image.fromarray(array))).astype(np.float32)
    got = ours(op, array, magnitude)
    diff = np.abs(got - expected)
    if op.startswith(("shear", "translate")):
        assert (diff > 0).mean() < 0.01  # nearest sampling: ties at pixel edges may differ
    else:
        assert diff.max() <= tolerance + 1e-3, (op, diff.max())
    assert not np.array_equal(got, array.astype(np.float32))


def test_rotate_quarter_turn_is_rot90():
    array = image(2)
    got = ours("rotate", array, 90.0)
    turned = np.rot90(array, k=-1).astype(np.float32)  # y down: +90 degrees turns clockwise
    assert np.array_equal(got, turned) or np.array_equal(got, np.rot90(array, 1).astype(np.float32))


def test_policies_draw_torchvisions_magnitude_spaces():
    gen = torch.Generator().manual_seed(0)
    p = AA.Policy.parse("trivial").draw(28_000, 32, 32, gen)
    counts = torch.bincount(p["aa_ops"].flatten(), minlength=len(AA.OPS))
    assert counts.min() > 1800 and counts.max() < 2200  # one of 14 per image, uniformly
    post = p["aa_mag"][p["aa_ops"] == AA.OPS.index("posterize")]
    assert set(post.unique().tolist()) == set(range(2, 9))
    rot = p["aa_mag"][p["aa_ops"] == AA.OPS.index("rotate")]
    assert rot.abs().max() == pytest.approx(135.0) and (rot < 0).any() and (rot > 0).any()
    ra = AA.Policy.parse("rand-m9-n2")
    assert (ra.num_ops, ra.magnitude) == (2, 9)
    q = ra.draw(5000, 32, 32, gen)
    assert q["aa_ops"].shape == (5000, 2)
    rot = q["aa_mag"][q["aa_ops"] == AA.OPS.index("rotate")].abs()
    assert torch.allclose(rot, torch.tensor(9.0))  # bin 9 of 0..30 of 30 degrees
    shift = q["aa_mag"][q["aa_ops"] == AA.OPS.index("translate_x")].abs()
    assert torch.allclose(shift, torch.tensor(float(int(150 / 331 * 32 * 9 / 30))))


def test_a_batch_runs_each_operation_once_and_equals_image_by_image(monkeypatch):
    """No loop over images: 512 images make at most one call per operation and one
    grid_sample per operation in a row, and the result equals each image done alone."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (512, 3, 12, 12), dtype=torch.uint8, generator=gen)
    p = AA.Policy.parse("rand-m14-n2").draw(512, 12, 12, gen)
    calls = {"colour": 0, "grid": 0}
    for name, fn in list(AA.COLOUR_OPS.items()):
        def counted(*a, _fn=fn):
            calls["colour"] += 1
            return _fn(*a)
        monkeypatch.setitem(AA.COLOUR_OPS, name, counted)
    real_grid = F.grid_sample

    def grid(*a, **k):
        calls["grid"] += 1
        return real_grid(*a, **k)
    monkeypatch.setattr(AA.F, "grid_sample", grid)
    out = AA.apply(x, p["aa_ops"], p["aa_mag"])
    assert calls["colour"] <= 2 * len(AA.COLOUR_OPS) and calls["grid"] <= 2
    for i in range(0, 512, 37):
        alone = AA.apply(x[i:i + 1], p["aa_ops"][i:i + 1], p["aa_mag"][i:i + 1])
        assert torch.allclose(out[i:i + 1], alone, atol=1e-3), i


def test_loader_auto_augment_replays_each_epoch_and_changes_images():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(64) % 4

    def first(policy, epoch):
        loader = Loader(images, labels, 32, shuffle=True, mean=[0.5] * 3, std=[0.25] * 3,
                        augment=Augment(flip=True, auto_augment=policy))
        return next(iter(loader.epoch(epoch)))[0]

    a = first("trivial", 0)
    assert torch.equal(a, first("trivial", 0))
    assert not torch.equal(a, first("trivial", 1))
    plain = first("", 0)
    changed = (a - plain).abs().flatten(1).amax(1) > 1e-4
    assert 0.6 < changed.float().mean() < 1.0  # identity and no-op draws leave a few alone


def test_regulariser_flags_in_help_and_bad_values_are_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ema", "--ema-warmup", "--mixup", "--cutmix", "--mix-prob",
                 "--mix-switch-prob", "--auto-augment"):
        assert flag in text, flag
    for args, word in ((["--ema", "1.5"], "--ema"), (["--mixup", "-1"], "--mixup"),
                       (["--mix-prob", "2"], "--mix-prob"),
                       (["--auto-augment", "fancy"], "--auto-augment")):
        assert main(["train", "--dataset", "digits", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
