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
from vggkit.training.fused_bn import BatchNormReLU2d, FusedAwayReLU, use_fused_bn_relu

pytestmark = pytest.mark.skipif(fused_bn.library() is None,
                                reason="no C compiler to build the fused kernels")


def pair(channels: int, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """A stock BatchNorm2d + ReLU with non-trivial affine weights, and its fused twin."""
    torch.manual_seed(seed)
    stock = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    with torch.no_grad():
        stock[0].weight.uniform_(0.5, 1.5)
        stock[0].bias.uniform_(-0.5, 0.5)
        stock[0].running_mean.uniform_(-1, 1)
    fused = copy.deepcopy(stock)
    assert use_fused_bn_relu(fused) == 1
    assert type(fused[0]) is BatchNormReLU2d and type(fused[1]) is FusedAwayReLU
    return stock, fused


def run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad)
    bn = model[0]
    return (y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(),
            bn.running_var.clone(), int(bn.num_batches_tracked))


def inputs(shape, dtype, seed=1, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    cl = torch.channels_last
    return x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl)


@pytest.mark.parametrize("shape", [(8, 64, 6, 5), (3, 7, 1, 1), (64, 16, 8, 8)])
def test_fp32_matches_batchnorm_then_relu(shape):
    stock, fused = pair(shape[1])
    x, grad = inputs(shape, torch.float32)
    for _ in range(2):  # twice: the running statistics follow the momentum
        want, got = run(stock, x, grad), run(fused, x, grad)
    for name, a, b in zip(["y", "dx", "dweight", "dbias", "running_mean", "running_var"],
                          want, got):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5, msg=name)
    assert got[-1] == want[-1] == 2
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_bf16_is_no_further_from_float64_than_the_stock_layers():
    shape = (32, 128, 8, 8)
    stock, fused = pair(shape[1])
    x, grad = inputs(shape, torch.bfloat16)
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


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(fused_bn.DISABLE_ENV, "0")
    fused_bn.library.cache_clear()
    try:
        assert fused_bn.library() is None
        assert use_fused_bn_relu(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())) == 0
    finally:
        monkeypatch.delenv(fused_bn.DISABLE_ENV)
        fused_bn.library.cache_clear()
