"""The C dropout (issue 31): keeps 1 - p of the elements and scales them by 1 / (1 - p) as
nn.Dropout does, the gradient meets the same mask (any layout), the mask is the same for any
thread count and seed-reproducible, and evaluation, other layouts and the swap into a network
behave as nn.Dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vggkit.models import create_model
from vggkit.training import fused_bn
from vggkit.training.engine import make_engine
from vggkit.training.fast_dropout import FastDropout, use_fast_dropout

pytestmark = pytest.mark.skipif(fused_bn.library() is None,
                                reason="no C compiler to build the kernels")


def fast(p: float) -> FastDropout:
    m = nn.Dropout(p)
    assert use_fast_dropout(m) == 1 and type(m) is FastDropout
    return m.train()


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_keeps_one_minus_p_scaled_and_the_gradient_meets_the_same_mask(p):
    torch.manual_seed(0)
    x = torch.randn(400, 250, requires_grad=True)
    y = fast(p)(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[kept], x.detach()[kept] * scale)  # the same fp32 product
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * scale, torch.zeros(())))
    # no runs or stripes: the mask of neighbouring rows is not the same
    assert (kept[:-1] != kept[1:]).float().mean() > 0.25


def test_bf16_channels_last_with_a_gradient_in_another_layout():
    torch.manual_seed(1)
    x = torch.randn(8, 16, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = fast(0.3)(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    kept = y != 0
    want = (x.detach().float() * torch.tensor(1 / 0.7)).to(torch.bfloat16)
    assert torch.equal(y[kept], want[kept])
    g = torch.randn(8, 16, 6, 6).to(torch.bfloat16)  # contiguous (NCHW): other strides
    y.backward(g)
    wantg = torch.where(kept, (g.float() * torch.tensor(1 / 0.7)).to(torch.bfloat16),
                        torch.zeros((), dtype=torch.bfloat16))
    assert torch.equal(x.grad, wantg)


def test_the_mask_follows_the_seed_not_the_threads():
    x = torch.randn(100_000)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            outs.append(fast(0.4)(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(5)
    m = fast(0.4)
    first, second = m(x), m(x)
    assert torch.equal(first, outs[0]) and not torch.equal(first, second)


def test_evaluation_and_other_layouts_run_nn_dropout():
    m = fast(0.5)
    x = torch.randn(30, 40)
    assert torch.equal(m.eval()(x), x)
    m.train()
    strided = torch.randn(40, 30).t()  # not dense in any layout the kernel takes
    assert not m._fast_ok(strided) and m(strided).shape == strided.shape
    assert m._fast_ok(x)


def test_a_bf16_engine_swaps_the_compact_nets_dropouts_and_keeps_its_keys():
    model = create_model("vgg_compact", num_classes=10)
    keys = list(model.state_dict())
    stock = sum(type(m) is nn.Dropout for m in model.modules())
    engine = make_engine("cpu", "bf16", channels_last=True, compile=False)
    prepared = engine.prepare(model)
    assert sum(type(m) is FastDropout for m in prepared.modules()) == stock >= 4
    assert list(prepared.state_dict()) == keys
