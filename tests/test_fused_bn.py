"""The fused BatchNorm + ReLU kernels (issue 31): the same output, running statistics and
gradients as nn.BatchNorm2d followed by nn.ReLU, in fp32 to float rounding and in bf16 no
further from the float64 answer than the stock layers; the same bits on every run; swapped
into VGG-16-BN without changing its keys or its evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vggkit.models import create_model
from vggkit.training import fused_bn
from vggkit.training.fused_bn import (BatchNormReLU2d, FusedAwayReLU, ReLUBatchNorm2d,
                                      use_fused_bn_relu)

pytestmark = pytest.mark.skipif(fused_bn.library() is None,
                                reason="no C compiler to build the fused kernels")


def pair(channels: int, seed: int = 0, relu_first: bool = False
         ) -> tuple[nn.Sequential, nn.Sequential]:
    """A stock BatchNorm2d + ReLU (or ReLU + BatchNorm2d, the Keras order) with non-trivial
    affine weights, and its fused twin."""
    torch.manual_seed(seed)
    layers = [nn.BatchNorm2d(channels), nn.ReLU(inplace=not relu_first)]  # x is a leaf
    stock = nn.Sequential(*(layers[::-1] if relu_first else layers))
    bn = batchnorm(stock)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
    fused = copy.deepcopy(stock)
    assert use_fused_bn_relu(fused) == 1
    want = [FusedAwayReLU, ReLUBatchNorm2d] if relu_first else [BatchNormReLU2d, FusedAwayReLU]
    assert [type(m) for m in fused] == want
    return stock, fused


def batchnorm(model: nn.Sequential) -> nn.BatchNorm2d:
    return next(m for m in model if isinstance(m, nn.BatchNorm2d))


def run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad)
    bn = batchnorm(model)
    return (y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(),
            bn.running_var.clone(), int(bn.num_batches_tracked))


def inputs(shape, dtype, seed=1, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    cl = torch.channels_last
    return x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl)


@pytest.mark.parametrize("relu_first", [False, True])
@pytest.mark.parametrize("shape", [(8, 64, 6, 5), (3, 7, 1, 1), (64, 16, 8, 8)])
def test_fp32_matches_batchnorm_then_relu_and_relu_then_batchnorm(shape, relu_first):
    """Output and running statistics to float rounding; the gradients, sums over every
    pixel, as close to float64's as the stock layers' are."""
    stock, fused = pair(shape[1], relu_first=relu_first)
    exact = copy.deepcopy(stock).double()
    x, grad = inputs(shape, torch.float32, offset=0.5 if relu_first else 3.0)
    for _ in range(2):  # twice: the running statistics follow the momentum
        want, got = run(stock, x, grad), run(fused, x, grad)
        ref = run(exact, x.double(), grad.double())
    for name, a, b in zip(["y", "running_mean", "running_var"], want[:1] + want[4:6],
                          got[:1] + got[4:6]):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5, msg=name)
    for name, a, b, e in zip(["dx", "dweight", "dbias"], want[1:4], got[1:4], ref[1:4]):
        err_stock = (a.double() - e).norm() / e.norm()
        err_fused = (b.double() - e).norm() / e.norm()
        assert err_fused <= 1.5 * err_stock + 1e-6, (name, err_fused, err_stock)
    assert got[-1] == want[-1] == 2
    assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("relu_first", [False, True])
def test_bf16_is_no_further_from_float64_than_the_stock_layers(relu_first):
    shape = (32, 128, 8, 8)
    stock, fused = pair(shape[1], relu_first=relu_first)
    x, grad = inputs(shape, torch.bfloat16, offset=0.5 if relu_first else 3.0)
    exact = copy.deepcopy(stock).double()
    want = run(exact, x.double(), grad.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = run(stock, x, grad)
        got = run(fused, x, grad)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    for name, ref, b, g in zip(["y", "dx", "dweight", "dbias"], want, base, got):
        err_stock = (b.double() - ref).norm() / ref.norm()
        err_fused = (g.double() - ref).norm() / ref.norm()
        assert err_fused <= 1.2 * err_stock + 1e-6, (name, err_fused, err_stock)
    torch.testing.assert_close(got[4].double(), want[4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[5].double(), want[5], rtol=1e-3, atol=1e-3)


def test_the_same_bits_on_every_run():
    shape = (16, 64, 8, 8)
    x, grad = inputs(shape, torch.bfloat16, offset=100.0)  # a large mean: the shifted sums
    results = [run(pair(shape[1])[1], x, grad) for _ in range(2)]
    for a, b in zip(*results):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_other_layouts_and_evaluation_run_the_stock_layers():
    stock, fused = pair(8)
    x, _ = inputs((4, 8, 5, 5), torch.float32)
    nchw = x.contiguous()
    torch.testing.assert_close(fused(nchw), stock(nchw))  # the stock path, in training
    stock.eval(), fused.eval()
    torch.testing.assert_close(fused(x), stock(x))


def test_vgg16_bn_swaps_every_pair_keeps_its_keys_and_trains_as_before():
    """The whole network's gradients are as far from float64's as the stock layers' are."""
    torch.manual_seed(0)
    stock = create_model("vgg16_bn", num_classes=10, input_size=32)
    fused = copy.deepcopy(stock)
    exact = copy.deepcopy(stock).double()
    assert use_fused_bn_relu(fused) == 13
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == sum(
        isinstance(m, nn.ReLU) for m in stock.modules())
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(4)
    for model in (stock, fused, exact):
        model.to(memory_format=torch.channels_last)
        dtype = next(model.parameters()).dtype
        nn.functional.cross_entropy(model(x.to(dtype)), labels).backward()
    for (name, a), b, e in zip(stock.named_parameters(), fused.parameters(),
                               exact.parameters()):
        err_stock = (a.grad.double() - e.grad).norm() / e.grad.norm()
        err_fused = (b.grad.double() - e.grad).norm() / e.grad.norm()
        assert err_fused <= 1.5 * err_stock + 1e-5, (name, err_fused, err_stock)  # fp32 rounding
    for name, a in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], a, rtol=1e-4, atol=1e-5, msg=name)
    stock.eval(), fused.eval()
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)


def test_the_compact_net_fuses_its_relu_then_batchnorm_and_its_relus_still_report_dead():
    from vggkit.training.health import dead_relu_probe

    torch.manual_seed(0)
    stock = create_model("vgg_compact", num_classes=10, input_size=32, head="compact")
    fused = copy.deepcopy(stock)
    assert use_fused_bn_relu(fused) == sum(isinstance(m, nn.BatchNorm2d)
                                           for m in stock.features)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for model in (stock, fused):
        model.to(memory_format=torch.channels_last)
    outputs = []
    for model in (stock, fused):
        torch.manual_seed(1)  # the same dropout masks
        outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    dead = []
    for model in (stock, fused):
        with torch.no_grad():
            model.features[0].bias.fill_(-1e3)  # the first ReLU outputs only zeros
        with dead_relu_probe(model) as probe:
            model(x)
        dead.append(probe.dead)
    assert dead[0][0] == "features.1" and dead[1] == dead[0], dead


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(fused_bn.DISABLE_ENV, "0")
    fused_bn.library.cache_clear()
    try:
        assert fused_bn.library() is None
        assert use_fused_bn_relu(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())) == 0
    finally:
        monkeypatch.delenv(fused_bn.DISABLE_ENV)
        fused_bn.library.cache_clear()
