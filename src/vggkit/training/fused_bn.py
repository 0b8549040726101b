"""BatchNorm + ReLU fused for CPU training (issue 31): one read of each activation for the
statistics and one read and write to normalise, forward; two reads for the sums and one
pass for the input gradient, backward, where stock PyTorch makes five and eight passes.

The kernels (``kernels/bn_relu.c``) are plain C with OpenMP, built at first use with the
machine's compiler into the user cache and loaded with ctypes; without a compiler, or if the
build fails, the stock layers run and the log says why. :func:`use_fused_bn_relu` swaps each
``BatchNorm2d`` followed by a ``ReLU`` in a Sequential for :class:`BatchNormReLU2d` (one
preceded by a ReLU, the Keras order, for :class:`ReLUBatchNorm2d`) and the ReLU for
:class:`FusedAwayReLU` (class swaps: parameters, buffers, hooks and state-dict keys
stay). Only training on CPU tensors in channels_last (bf16 or fp32) takes the kernels;
evaluation, export, CUDA and other layouts run ``relu(batch_norm(x))`` as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vggkit.data.paths import user_cache_dir
from vggkit.training.cpu import cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "bn_relu.c"
DISABLE_ENV = "VGGKIT_FUSED_BN"  # "0": never build or use the kernels
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "forward": [_P, _P, _I, _I, _P, _P, ctypes.c_double, _P, _P, _P, ctypes.c_int],
    "backward": [_P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _P, ctypes.c_int],
}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(out: Path) -> None:
    """Compile the kernels into ``out`` (atomically: concurrent processes may race)."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    os.replace(tmp, out)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source version and machine; None if they cannot
    be (logged once) or ``VGGKIT_FUSED_BN=0``."""
    if os.environ.get(DISABLE_ENV) == "0" or sys.platform != "linux":
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + _machine()).hexdigest()[:16]
    path = user_cache_dir() / "kernels" / f"bn_relu-{key}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        log.info("fused BatchNorm+ReLU off (stock layers run): %s", err)
        return None
    for suffix in ("bf16", "f32"):
        for kind, args in _SIGNATURES.items():
            fn = getattr(lib, f"bn_relu_{kind}_{suffix}")
            fn.argtypes, fn.restype = args, None
        fn = getattr(lib, f"dropout_{suffix}")  # training/fast_dropout.py
        fn.argtypes, fn.restype = [_P, _P, _I, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float], None
    return lib


def _machine() -> bytes:
    """What -march=native depends on: the CPU's model and flags (one build per CPU kind, as
    a cache folder may be shared between machines)."""
    return (os.uname().machine + cpu_info("model name") + cpu_info("flags")).encode()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _suffix(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


class _BatchNormReLU(torch.autograd.Function):
    """relu(batch_norm(x)), or batch_norm(relu(x)) with ``relu_first``, in training mode;
    also returns the batch mean and biased variance for the running statistics (not
    differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu_first):
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        stats = torch.empty(3, c, dtype=torch.float32)  # mean, invstd, biased variance
        lib = library()
        getattr(lib, f"bn_relu_forward_{_suffix(x.dtype)}")(
            _ptr(x), _ptr(y), n * h * w, c, _ptr(weight), _ptr(bias), eps,
            _ptr(stats[0]), _ptr(stats[1]), _ptr(stats[2]), int(relu_first))
        # relu first: the backward needs x alone (its mask and relu(x) come from it)
        ctx.save_for_backward(x, x if relu_first else y, weight, stats)
        ctx.relu_first = relu_first
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        x, y, weight, stats = ctx.saved_tensors
        n, c, h, w = x.shape
        grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x)
        grads = torch.empty(2, c, dtype=torch.float32)  # weight, bias
        getattr(library(), f"bn_relu_backward_{_suffix(x.dtype)}")(
            _ptr(x), _ptr(y), _ptr(grad_y), _ptr(grad_x), n * h * w, c, _ptr(weight),
            _ptr(stats[0]), _ptr(stats[1]), _ptr(grads[0]), _ptr(grads[1]),
            int(ctx.relu_first))
        return grad_x, grads[0], grads[1], None, None


class BatchNormReLU2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose output goes through ReLU (the next layer is a
    :class:`FusedAwayReLU`). In training on a CPU channels_last bf16/fp32 tensor the fused
    kernels run; otherwise ``relu(batch_norm(x))``. Same parameters, buffers and keys."""

    relu_first = False

    def _stock(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))

    def _fused_ok(self, x: torch.Tensor) -> bool:
        return (self.training and self.track_running_stats and self.affine
                and x.dim() == 4 and x.device.type == "cpu"
                and x.dtype in (torch.bfloat16, torch.float32)
                and self.weight.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last)
                and x.shape[0] * x.shape[2] * x.shape[3] > 1 and library() is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_ok(x):
            return self._stock(x)
        with torch.autocast("cpu", enabled=False):
            y, stats = _BatchNormReLU.apply(x, self.weight, self.bias, self.eps,
                                            self.relu_first)
        self._update_running_stats(stats[0], stats[2], x.shape[0] * x.shape[2] * x.shape[3])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """As nn.BatchNorm2d: the momentum (or the cumulative average when it is None) and
        the unbiased variance."""
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var * (n / (n - 1)), momentum)


class ReLUBatchNorm2d(BatchNormReLU2d):
    """nn.BatchNorm2d after a ReLU (the Keras order; the ReLU before it is a
    :class:`FusedAwayReLU`): ``batch_norm(relu(x))``, fused as :class:`BatchNormReLU2d`."""

    relu_first = True

    def _stock(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, F.relu(x))


class FusedAwayReLU(nn.ReLU):
    """A ReLU that the BatchNorm beside it applies: passes its input through. Still an
    nn.ReLU, so hooks on ReLU layers see it (the dead-ReLU probe asks whether any output is
    above zero, which its input answers as the ReLU's output would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _plain_bn(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d and module.affine and module.track_running_stats


def use_fused_bn_relu(model: nn.Module) -> int:
    """Swap each BatchNorm2d next to a ReLU in a Sequential (BatchNorm then ReLU, or ReLU
    then BatchNorm) for a fused pair, in place. Returns how many pairs were swapped; 0 when
    the kernels are unavailable."""
    if library() is None:
        return 0
    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        layers = list(seq)
        for first, second in zip(layers, layers[1:]):
            if _plain_bn(first) and type(second) is nn.ReLU:
                first.__class__, second.__class__ = BatchNormReLU2d, FusedAwayReLU
            elif type(first) is nn.ReLU and _plain_bn(second):
                first.__class__, second.__class__ = FusedAwayReLU, ReLUBatchNorm2d
            else:
                continue
            n += 1
    return n
