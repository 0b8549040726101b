"""The fused optimizer step (torch's one-pass kernels, on by default on CPU and CUDA) makes the
same update as the per-parameter loop, and the two states its kernels assume but do not check
are settled: buffers laid out as their channels_last parameters after a checkpoint load, and
momentum buffers for parameters that start training after others (--freeze-epochs)."""

from __future__ import annotations

import pytest
import torch

from vggkit.config import TrainConfig
from vggkit.models import create_model
from vggkit.training.optim import build_optimizer, settle_fused_state


def model_and_grads(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("vgg11_bn", num_classes=10, in_channels=3, input_size=32)
    model = model.to(memory_format=torch.channels_last)
    grads = [torch.randn_like(p) for p in model.parameters()]
    return model, grads


def steps(optimizer, model, grads, n: int) -> None:
    for _ in range(n):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_equals_the_loop_and_survives_a_contiguous_state_load(name):
    config = TrainConfig(optimizer=name, lr=0.01)
    loop_model, grads = model_and_grads()
    fused_model, _ = model_and_grads()
    loop = build_optimizer(loop_model, config, 0.01)
    for group in loop.param_groups:
        group["fused"], group["foreach"] = False, False
    fused = build_optimizer(fused_model, config, 0.01)
    assert all(g["fused"] for g in fused.param_groups)
    steps(loop, loop_model, grads, 2)
    steps(fused, fused_model, grads, 2)
    # a checkpoint's state comes back contiguous; channels_last weights are not
    state = fused.state_dict()
    state["state"] = {k: {n: v.contiguous() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    fused.load_state_dict(state)
    assert any(s[k].stride() != p.stride() for p in fused_model.parameters()
               for s in [fused.state[p]] for k in s if torch.is_tensor(s[k]) and s[k].dim() == 4)
    settle_fused_state(fused)
    steps(loop, loop_model, grads, 2)
    steps(fused, fused_model, grads, 2)
    for a, b in zip(loop_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_that_start_training_later_get_an_exact_momentum_buffer():
    config = TrainConfig(optimizer="sgd", lr=0.01)
    results = []
    for fused_on in (False, True):
        model, grads = model_and_grads()
        opt = build_optimizer(model, config, 0.01)
        for group in opt.param_groups:
            group["fused"], group["foreach"] = fused_on, False
        for p in model.features.parameters():
            p.requires_grad_(False)
        for _ in range(2):  # the head alone
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone() if p.requires_grad else None
            opt.step()
        for p in model.features.parameters():
            p.requires_grad_(True)
        settle_fused_state(opt)
        steps(opt, model, grads, 2)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
