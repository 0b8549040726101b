"""Unit tests of the training engine (fast; no timings)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch import nn

import vggkit.training.engine as E
from vggkit.errors import UsageError
from vggkit.training.engine import (
    Engine,
    FastConv2d,
    TrainStep,
    conv3x3_weight_grad,
    make_engine,
    predict_logits,
    resolve_precision,
    use_fast_convs,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, expect", [
    ({"amx_bf16", "avx512_bf16"}, "bf16"),
    ({"avx512_bf16"}, "bf16"),
    ({"avx2", "fma"}, "fp32"),
    (set(), "fp32"),
])
def test_auto_precision_follows_cpu_flags(monkeypatch, flags, expect):
    monkeypatch.setattr(E, "cpu_flags", lambda: frozenset(flags))
    chosen, why = resolve_precision("auto", CPU)
    assert chosen == expect and why


def test_explicit_precision_and_fp16_on_cpu():
    assert resolve_precision("fp32", CPU)[0] == "fp32"
    assert resolve_precision("bf16", CPU)[0] == "bf16"
    with pytest.raises(UsageError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_make_engine_describes_its_choices():
    eng = make_engine("cpu", "fp32", channels_last=True, compile=False)
    d = eng.describe()
    assert d["precision"] == "fp32" and d["device"] == "cpu" and d["fast_convs"] is False
    assert make_engine("cpu", "bf16", True, False).fast_convs


@pytest.mark.parametrize("hw", [1, 2, 4, 5])
def test_matmul_weight_grad_matches_convolution_backward(hw):
    torch.manual_seed(0)
    x = torch.randn(3, 5, hw, hw, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    y = nn.functional.conv2d(x, w, padding=1)
    g = torch.randn_like(y)
    y.backward(g)
    got = conv3x3_weight_grad(x.contiguous(memory_format=torch.channels_last),
                              g.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, w.grad)


@pytest.mark.parametrize("channels, side, bias", [
    (16, 2, True),  # every 2x2 map (the dense-layer form)
    (16, 1, True),  # a 1x1 map: only the centre tap meets data
    (512, 4, True),  # 4x4 only with >= 512 input channels (VGG's last stage at 32x32)
    (16, 2, False),  # bias=False (the BatchNorm networks' convolutions could drop it)
])
def test_fast_conv_matches_stock_conv_under_bf16_autocast(channels, side, bias):
    torch.manual_seed(0)
    ref = nn.Conv2d(channels, 8, 3, padding=1, bias=bias)
    fast = nn.Conv2d(channels, 8, 3, padding=1, bias=bias)
    fast.load_state_dict(ref.state_dict())
    model = nn.Sequential(fast)
    assert use_fast_convs(model) == 1 and isinstance(model[0], FastConv2d)
    assert use_fast_convs(model) == 0  # already swapped
    assert list(model[0].state_dict()) == (["weight", "bias"] if bias else ["weight"])
    x = torch.randn(4, channels, side, side).contiguous(memory_format=torch.channels_last)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0]._fast_ok(xf)
        yr, yf = ref(xr), model(xf)
    torch.testing.assert_close(yf, yr)
    g = torch.randn_like(yr, dtype=torch.float32)
    yr.float().backward(g)
    yf.float().backward(g)
    pairs = [(fast.weight.grad, ref.weight.grad), (xf.grad, xr.grad)]
    pairs += [(fast.bias.grad, ref.bias.grad)] if bias else []
    assert fast.bias is None or fast.bias.grad is not None
    for a, b in pairs:
        assert a.dtype == b.dtype
        # bf16 products summed over up to 4*4*4 positions (or 9*512 inputs) in other orders
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * max(1.0, float(b.abs().max()) / 10))


@pytest.mark.parametrize("stride, padding", [(2, 1), (1, 0)])
def test_fast_conv_falls_back_to_the_stock_layer_for_other_geometry(monkeypatch, stride, padding):
    """Only 3x3/stride-1/padding-1 convolutions take the matmul path; a stride-2 or unpadded
    one on a small map is the stock convolution, bit for bit, forward and backward."""
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 8, 3, stride=stride, padding=padding)
    fast = nn.Conv2d(16, 8, 3, stride=stride, padding=padding)
    fast.load_state_dict(ref.state_dict())
    use_fast_convs(nn.Sequential(fast))

    def must_not_run(*args):
        raise AssertionError("the matmul weight-gradient path ran")

    monkeypatch.setattr(E._SmallMapConv3x3, "apply", must_not_run)
    monkeypatch.setattr(E._DenseSmallMapConv3x3, "apply", must_not_run)
    x = torch.randn(4, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast._fast_ok(xf)
        yr, yf = ref(xr), fast(xf)
    assert torch.equal(yf, yr)
    g = torch.randn_like(yr, dtype=torch.float32)
    yr.float().backward(g)
    yf.float().backward(g)
    for a, b in [(fast.weight.grad, ref.weight.grad), (fast.bias.grad, ref.bias.grad), (xf.grad, xr.grad)]:
        assert torch.equal(a, b)


def test_fast_conv_is_stock_in_fp32_and_inference():
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    use_fast_convs(conv)
    x = torch.randn(2, 4, 4, 4)
    assert not conv[0]._fast_ok(x)  # fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv[0]._fast_ok(x)  # no gradient wanted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv[0]._fast_ok(torch.randn(2, 4, 2, 2))
        assert not conv[0]._fast_ok(torch.randn(2, 4, 4, 4))  # 4x4 only with >= 512 channels
        assert not conv[0]._fast_ok(torch.randn(2, 4, 8, 8))  # map too large


@pytest.mark.parametrize("h, w", [(2, 2), (1, 1), (1, 2), (2, 1)])
def test_dense_small_map_conv_is_the_convolution(h, w):
    """In float64 the dense-layer form of a 3x3 convolution on a map of at most 4 pixels gives
    the convolution's output and all three gradients to rounding."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    g = torch.randn(3, 7, h, w, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = E._DenseSmallMapConv3x3.apply(*ins)
    y_ref = torch.nn.functional.conv2d(*ref, padding=1)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(y_ref, ref, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the weight's taps sum in fp32


def test_dense_small_map_weight_gradient_rounds_to_bf16_once_as_the_convolution():
    """In bf16 the dense form's weight gradient is as close to the exact (float64) one as
    nn.Conv2d's own: each tap's pixel pairs sum inside one matmul (in fp32), then one rounding.
    (Rounding a block per pair to bf16 before the sum erred 2.25e-3 against the conv's 1.66e-3.)"""
    torch.manual_seed(0)
    x = torch.randn(64, 256, 2, 2).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3) * 0.05).bfloat16()
    g = torch.randn(64, 256, 2, 2).bfloat16()

    def weight_grad(fn, *ins):
        ins = [t.clone().requires_grad_() for t in ins]
        y = fn(*ins)
        return torch.autograd.grad(y, ins[1], g.to(y.dtype))[0].double()

    conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    exact = weight_grad(conv, x.double(), w.double())
    error = {name: ((weight_grad(fn, x, w) - exact).norm() / exact.norm()).item()
             for name, fn in (("conv", conv),
                              ("dense", lambda x, w: E._DenseSmallMapConv3x3.apply(x, w, None)))}
    assert error["dense"] <= 1.05 * error["conv"], error


@pytest.mark.parametrize("side", [2, 4])
def test_fast_conv_output_takes_an_inplace_relu(side):
    """A plain VGG (or the compact net) puts nn.ReLU(inplace=True) right after the convolution:
    the engine's output must not be a view autograd forbids modifying."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
    use_fast_convs(net)
    x = torch.randn(2, 8, side, side).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    y.float().sum().backward()
    assert net[0].weight.grad is not None and (y >= 0).all()


def test_small_maps_take_the_path_measured_faster(monkeypatch):
    """2x2 maps: the dense form (512->512: 27 -> 14 ms a layer, fwd + bwd, on the Zen 5);
    4x4 with 512 channels: oneDNN forward and input gradient, matmul weight gradient."""
    used = []
    for cls in (E._DenseSmallMapConv3x3, E._SmallMapConv3x3):
        monkeypatch.setattr(cls, "apply", lambda *a, cls=cls: used.append(cls) or a[0])
    conv = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1))
    use_fast_convs(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for side in (2, 4):
            conv(torch.randn(1, 512, side, side, requires_grad=True))
    assert used == [E._DenseSmallMapConv3x3, E._SmallMapConv3x3]


def test_matmul_weight_grad_is_used_where_it_measured_faster():
    assert E.use_matmul_wgrad(512, 2, 2) and E.use_matmul_wgrad(64, 2, 2)
    assert E.use_matmul_wgrad(512, 4, 4) and not E.use_matmul_wgrad(256, 4, 4)
    assert not E.use_matmul_wgrad(512, 8, 8)


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),  # 2x2: matmul wgrad
        nn.Flatten(), nn.Linear(16 * 2 * 2, 4))


def tiny_data(n=64):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    images[torch.arange(n), labels % 3, :4, :4] += 2.0  # a learnable signal
    return images, labels


def train(engine: Engine, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = engine.prepare(tiny_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = TrainStep(model, opt, nn.CrossEntropyLoss(), engine)
    images, labels = tiny_data()
    x = engine.to_input(images)
    losses = [float(step(x, labels)[0]) for _ in range(steps)]
    return model, losses


def test_bf16_path_loss_decreases():
    eng = make_engine("cpu", "bf16", channels_last=True, compile=False)
    model, losses = train(eng, 25)
    assert any(isinstance(m, FastConv2d) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert losses[-1] < 0.5 * losses[0]
    logits = predict_logits(model, eng.to_input(tiny_data()[0]), eng)
    assert logits.dtype == torch.float32 and logits.shape == (64, 4)


def test_fp32_steps_are_bit_for_bit_deterministic():
    eng = make_engine("cpu", "fp32", channels_last=True, compile=False)
    m1, l1 = train(eng, 5)
    m2, l2 = train(eng, 5)
    assert l1 == l2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(isinstance(m, FastConv2d) for m in m1.modules())


def test_train_step_returns_device_tensors():
    eng = make_engine("cpu", "fp32", channels_last=False, compile=False)
    torch.manual_seed(0)
    model = eng.prepare(tiny_net())
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), eng)
    images, labels = tiny_data(8)
    loss, correct = step(eng.to_input(images), labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert correct.dtype == torch.int64 and 0 <= int(correct) <= 8


# ----------------------------------------------------------------------------- CUDA decisions
# What can be checked without a GPU: device selection and the precision and scaler choices
# (bench/gpu_check.py runs the rest on hardware).
CUDA = torch.device("cuda")


@pytest.mark.parametrize("bf16_ok, expect, scaler", [(True, "bf16", False), (False, "fp16", True)])
def test_auto_precision_on_cuda_and_its_loss_scaler(monkeypatch, bf16_ok, expect, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    chosen, why = resolve_precision("auto", CUDA)
    assert chosen == expect and ("loss scaling" in why) == scaler
    engine = E.Engine(CUDA, chosen, True, False, why)
    assert (engine.make_scaler() is not None) == scaler


def test_bf16_refused_on_a_cuda_device_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UsageError, match="--precision bf16"):
        resolve_precision("bf16", CUDA)


def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert E.resolve_device("auto").type == "cpu"
    with pytest.raises(UsageError, match="--device cuda"):
        E.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert E.resolve_device("auto").type == "cuda"


def test_the_scaler_skips_a_step_whose_gradients_overflowed():
    """The fp16 path's GradScaler decisions, on CPU: an inf gradient skips the update and
    halves the scale; a finite one updates."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = model.weight.detach().clone()
    loss = model(torch.full((1, 4), float("inf"))).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, before) and scaler.get_scale() == 512.0
    opt.zero_grad()
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, before)


def test_engine_keeps_freed_memory_unless_the_user_set_the_allocator(monkeypatch):
    from vggkit.training.engine import keep_freed_memory

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory.__wrapped__() is True  # mallopt accepted both settings
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory.__wrapped__() is False  # the user's choice wins
