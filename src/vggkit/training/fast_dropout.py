"""Dropout for CPU training as one C/OpenMP pass each way (issue 31).

PyTorch's CPU dropout draws its mask with ``bernoulli_``, one Mersenne Twister draw per element
in turn: in the compact VGG's bf16 training step (four dropouts) that was 13% of the step, more
than every BatchNorm and ReLU together. Here the mask comes from a counter-based hash of a seed
and the element's index (``dropout_*`` in ``kernels/bn_relu.c``): vectorised, the same for any
thread count, and recomputed in the backward from the seed instead of being stored. The seed is
one draw from torch's generator per call, so a run is reproducible and a resume exact (the
generator is in every checkpoint). The mask is a different random draw than PyTorch's; keep
probability and scaling are the same (``1 - p``, ``1 / (1 - p)``).

:func:`use_fast_dropout` swaps each ``nn.Dropout`` for :class:`FastDropout` (a class swap:
same keys, hooks, ``p``). Only training on dense CPU bf16/fp32 tensors takes the kernel;
evaluation, CUDA and other layouts run ``nn.Dropout`` as before.
"""

from __future__ import annotations

import torch
from torch import nn

from vggkit.training.fused_bn import library

_SEED_RANGE = 2**62


def _memory_format(x: torch.Tensor) -> torch.memory_format | None:
    """The layout in which ``x`` is dense, or None."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _apply(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    y = torch.empty_like(x)
    threshold = min(2**32 - 1, round(p * 2**32))
    suffix = "bf16" if x.dtype == torch.bfloat16 else "f32"
    getattr(library(), f"dropout_{suffix}")(x.data_ptr(), y.data_ptr(), x.numel(), seed,
                                            threshold, 1.0 / (1.0 - p))
    return y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed, ctx.layout = p, seed, _memory_format(x)
        return _apply(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        # the same storage order as the input, so that element i meets the same mask bit
        grad = grad.contiguous(memory_format=ctx.layout)
        return _apply(grad, ctx.p, ctx.seed), None, None


class FastDropout(nn.Dropout):
    """nn.Dropout whose training mask on a dense CPU bf16/fp32 tensor comes from the C kernel."""

    def _fast_ok(self, x: torch.Tensor) -> bool:
        return (self.training and 0.0 < self.p < 1.0 and not self.inplace
                and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                and _memory_format(x) is not None and x.numel() > 0 and library() is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_ok(x):
            return super().forward(x)
        seed = int(torch.randint(0, _SEED_RANGE, (1,)))
        with torch.autocast("cpu", enabled=False):
            return _Dropout.apply(x, self.p, seed)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap each plain nn.Dropout for :class:`FastDropout`, in place; returns how many (0 when
    the kernels are unavailable)."""
    if library() is None:
        return 0
    swapped = [m for m in model.modules() if type(m) is nn.Dropout]
    for m in swapped:
        m.__class__ = FastDropout
    return len(swapped)
