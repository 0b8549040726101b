"""Device, precision and the compiled training step: the one place where the speed
decisions live (summary.json reports what they chose).

The trainer's seam (unchanged)::

    engine = make_engine(device, precision, channels_last, compile, threads)
    model = engine.prepare(model)          # device, layout; CPU bf16: FastConv2d swap
    model = engine.maybe_compile(model)
    optimizer = ...(model.parameters())    # fp32 parameters: they are the master weights
    step = TrainStep(model, optimizer, loss_fn, engine)
    loss, correct = step(engine.to_input(images), labels)
    logits = predict_logits(model, engine.to_input(images), engine)

On a CPU with native bf16 (AMX-BF16 or AVX512-BF16) ``--precision auto`` picks bf16: autocast
with channels_last, and :class:`FastConv2d`, which computes the weight gradient of 3x3
convolutions on maps of at most 4x4 as one bf16 matmul instead of oneDNN's slow kernel there.
fp32 runs the stock modules and stays bit-for-bit deterministic. Measurements and what did not
help (bf16 weights with master copies, torch.compile): docs/benchmarks.md. On CPU the engine
also keeps freed memory in the process (:func:`keep_freed_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vggkit.errors import UsageError
from vggkit.training.cpu import cpu_flags, cpu_info
from vggkit.training.fused_bn import library as fused_bn_library
from vggkit.training.fast_dropout import use_fast_dropout
from vggkit.training.fused_bn import use_fused_bn_relu

log = logging.getLogger(__name__)


def cpu_name() -> str:
    if cpu_info("model name"):
        return cpu_info("model name")
    import platform

    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 tiles or AVX512-BF16 dot products: bf16 convolutions outrun fp32 there."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(chosen precision, why) for ``--precision``."""
    if device.type == "cuda":
        # Native bf16 only (Ampere and newer): a T4 or V100 "supports" it by emulation, slowly;
        # those get fp16 with loss scaling.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "auto":
            return ("bf16", "CUDA device supports bf16") if bf16_ok else (
                "fp16", "CUDA device without bf16: fp16 autocast with loss scaling")
        if precision == "bf16" and not bf16_ok:
            raise UsageError("--precision bf16: this CUDA device has no native bf16 (it would be "
                             "emulated, slowly); use --precision fp16 or auto")
        return precision, "as asked"
    if precision == "fp16":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    if precision == "auto":
        flags = cpu_flags()
        if "amx_bf16" in flags:
            return "bf16", "CPU has AMX-BF16"
        if "avx512_bf16" in flags:
            return "bf16", "CPU has AVX512-BF16"
        return "fp32", "CPU has no native bf16 arithmetic"
    return precision, "as asked"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# -- convolution weight gradients as one matmul at small spatial sizes ---------------------------
#
# oneDNN's bf16 backward-weights kernel is slow for 3x3 convolutions on tiny feature maps (VGG's
# 4x4 and 2x2 stages at 32x32 input): measured on this repo's CPU it runs 2x (4x4, 512 channels)
# to 4.5x (2x2) slower than forming the 9 shifted copies of the input (im2col, cheap at these
# sizes) and doing one bf16 matmul with fp32 accumulation. See docs/benchmarks.md.
#
# Where the matmul weight gradient wins (bench/train_step.py --layers): every 2x2 map (3-7x), and
# 4x4 maps with 512 input channels (2x); 256->512 at 4x4 is a tie or a loss, 8x8 and up a loss.
# Maps of at most DENSE_MAP pixels now take the dense form below instead (2x faster again).
SMALL_MAP = 4  # H*W at or below which the engine's path is always used
SMALL_MAP_WIDE = 16  # ... and up to this H*W when the input has at least WIDE_CHANNELS
WIDE_CHANNELS = 512


def use_matmul_wgrad(in_channels: int, h: int, w: int) -> bool:
    return h * w <= SMALL_MAP or (h * w <= SMALL_MAP_WIDE and in_channels >= WIDE_CHANNELS)


def conv3x3_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of a 3x3, stride-1, padding-1 convolution, as one matmul:
    (C_out x B*H*W) @ (B*H*W x 9*C_in). Returns (C_out, C_in, 3, 3), channels_last strides."""
    b, ci, h, w = x.shape
    co = grad_out.shape[1]
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # B, H+2, W+2, C_in
    cols = torch.stack([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=3)
    g = grad_out.permute(0, 2, 3, 1).reshape(-1, co)
    dw = torch.mm(g.t(), cols.reshape(-1, 9 * ci))
    return dw.view(co, 3, 3, ci).permute(0, 3, 1, 2)


class _SmallMapConv3x3(torch.autograd.Function):
    """conv2d(x, w, b, padding=1) whose backward computes the weight gradient with
    :func:`conv3x3_weight_grad` and the input gradient with oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = conv3x3_weight_grad(x, grad_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3), dtype=torch.float32).to(grad_out.dtype)
        return gx, gw, gb


# -- 3x3 convolutions on maps of at most 4 pixels as one dense matmul ----------------------------
#
# On a 2x2 map every output pixel sees every input pixel through one of the 3x3 taps, and 5 of
# the 9 taps only ever meet the zero padding. Written as a dense layer from the H*W*C_in inputs
# to the H*W*C_out outputs, forward, input gradient and weight gradient are three plain bf16
# matmuls doing 4/9 of the convolution's nominal multiplies (VGG's last stage at 32x32 input).
DENSE_MAP = 4  # H*W at or below which the convolution is computed as a dense layer


@functools.cache
def conv3x3_tap_index(h: int, w: int) -> torch.Tensor:
    """(H*W inputs, H*W outputs) -> the 3x3 tap joining them, or 9 where none does."""
    p = torch.arange(h * w)
    dy = (p // w)[:, None] - (p // w)[None, :] + 1
    dx = (p % w)[:, None] - (p % w)[None, :] + 1
    inside = (dy >= 0) & (dy <= 2) & (dx >= 0) & (dx <= 2)
    return torch.where(inside, dy * 3 + dx, torch.full_like(dy, 9))


@functools.cache
def conv3x3_tap_pairs(h: int, w: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """For each of the 9 taps: the (input pixels, output pixels) it joins on an H x W map."""
    taps = conv3x3_tap_index(h, w)
    pairs = [torch.nonzero(taps == t) for t in range(9)]
    return tuple((p[:, 0].clone(), p[:, 1].clone()) for p in pairs)


def conv3x3_dense_weight(weight: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The (H*W*C_in, H*W*C_out) matrix of a padding-1 3x3 convolution on an H x W map, rows and
    columns ordered (pixel, channel) as channels_last memory is."""
    co, ci = weight.shape[:2]
    per_tap = torch.cat([weight.permute(2, 3, 1, 0).reshape(9, ci, co), weight.new_zeros(1, ci, co)])
    n = taps.shape[0]
    return per_tap[taps].permute(0, 2, 1, 3).reshape(n * ci, n * co)


class _DenseSmallMapConv3x3(torch.autograd.Function):
    """conv2d(x, w, b, padding=1) for H*W <= DENSE_MAP, channels_last, as matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        b, ci, h, w = x.shape
        co = weight.shape[0]
        taps = conv3x3_tap_index(h, w)
        dense = conv3x3_dense_weight(weight, taps)
        x_flat = x.permute(0, 2, 3, 1).reshape(b, h * w * ci)  # a view for channels_last
        # written into a channels_last tensor, not returned as a view of the matmul's result:
        # the next layer may be an in-place ReLU, which autograd forbids on a Function's views
        y = torch.empty(b, co, h, w, dtype=x.dtype, memory_format=torch.channels_last)
        y_flat = y.permute(0, 2, 3, 1).view(b, h * w * co)
        if bias is None:
            torch.mm(x_flat, dense, out=y_flat)
        else:
            torch.addmm(bias.repeat(h * w), x_flat, dense, out=y_flat)
        ctx.save_for_backward(x_flat, dense)
        ctx.dims, ctx.has_bias = (b, ci, h, w, co), bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_flat, dense = ctx.saved_tensors
        b, ci, h, w, co = ctx.dims
        g = grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, -1)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, dense.t()).view(b, h, w, ci).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            gw = _dense_weight_grad(x_flat.view(b, h * w, ci), g.view(b, h * w, co), h, w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.view(-1, co).sum(0, dtype=torch.float32).to(g.dtype)
        return gx, gw, gb


def _dense_weight_grad(x: torch.Tensor, g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Each tap's weight gradient as one matmul over every (input, output) pixel pair it joins,
    the pairs stacked along the batch: the matmul sums them in fp32 and rounds once, as the
    convolution's own weight gradient does (a block per pair, rounded to bf16, then summed,
    erred ~2.5e-3 relative)."""
    b, _, ci = x.shape
    co = g.shape[2]
    out = x.new_zeros(9, ci, co)
    for tap, (p_in, p_out) in enumerate(conv3x3_tap_pairs(h, w)):
        if len(p_in):
            xs = x.index_select(1, p_in).reshape(b * len(p_in), ci)
            gs = g.index_select(1, p_out).reshape(b * len(p_out), co)
            torch.mm(xs.t(), gs, out=out[tap])
    return out.view(3, 3, ci, co).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


class FastConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) that routes bf16 training of 3x3
    convolutions on small feature maps (:func:`use_matmul_wgrad`) through
    :class:`_DenseSmallMapConv3x3` (maps of at most DENSE_MAP pixels) or
    :class:`_SmallMapConv3x3`; everything else (fp32, inference, export, other shapes) is the
    stock convolution."""

    def _fast_ok(self, x: torch.Tensor) -> bool:
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and x.dim() == 4 and use_matmul_wgrad(x.shape[1], x.shape[2], x.shape[3])
                and torch.is_grad_enabled() and self.weight.requires_grad
                and x.device.type == "cpu"
                and (x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and
                     torch.get_autocast_dtype("cpu") == torch.bfloat16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_ok(x):
            return super().forward(x)
        w, b = self.weight, self.bias
        if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
            x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
            b = b.to(torch.bfloat16) if b is not None else None
        dense = x.shape[2] * x.shape[3] <= DENSE_MAP
        with torch.autocast("cpu", enabled=False):
            fn = _DenseSmallMapConv3x3 if dense else _SmallMapConv3x3
            return fn.apply(x.contiguous(memory_format=torch.channels_last), w, b)


def use_fast_convs(model: nn.Module) -> int:
    """Turn the model's plain nn.Conv2d layers into :class:`FastConv2d` in place (a class swap:
    parameters, hooks and state-dict keys are unchanged). Returns how many were swapped."""
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Conv2d:
            mod.__class__ = FastConv2d
            n += 1
    return n


@dataclass
class Engine:
    """How tensors are laid out and computed; built once per run."""

    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    channels_last: bool = True
    compile: bool = False
    precision_reason: str = ""
    fuse_bn: bool = True  # BatchNorm + ReLU fused where fast_convs are (training/fused_bn.py)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """A float batch on the device in the engine's memory format."""
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    @property
    def fast_convs(self) -> bool:
        """bf16 training on a CPU: small-map 3x3 weight gradients as matmuls (FastConv2d)."""
        return self.device.type == "cpu" and self.precision == "bf16"

    @property
    def fused_bn(self) -> bool:
        """BatchNorm + ReLU as one kernel each way (CPU bf16, eager, kernels built)."""
        return (self.fuse_bn and self.fast_convs and not self.compile
                and self.channels_last and fused_bn_library() is not None)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and layout; on CPU bf16, swap in FastConv2d, the
        fused BatchNorm + ReLU and the C dropout."""
        model = model.to(self.device, memory_format=self.memory_format)
        if self.fast_convs:
            use_fast_convs(model)
        if self.fused_bn:  # the same C kernels: BatchNorm + ReLU, and dropout
            use_fused_bn_relu(model)
            use_fast_dropout(model)
        return model

    def maybe_compile(self, model: nn.Module) -> nn.Module:
        if not self.compile:
            return model
        return torch.compile(model)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        if self.precision == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return None

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "fast_convs": self.fast_convs,
            "fused_bn": self.fused_bn,
            "threads": torch.get_num_threads(),
        }


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory instead of handing it back to the kernel at once.

    By default glibc serves every block above 128 KiB-32 MiB with its own mmap and trims the
    heap's free top, so each training step maps, zero-fills and unmaps its activations
    again. Keeping them is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do; set at
    process start they made the VGG-16-BN bf16 step ~10% faster on the AMX Xeon, set here at
    run time ~4% (docs/benchmarks.md). The cost: the process keeps its peak memory. Skipped
    off glibc, or when the user set either variable."""
    if sys.platform != "linux" or "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def make_engine(device: str, precision: str, channels_last: bool, compile: bool,
                threads: int | None = None) -> Engine:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    chosen, why = resolve_precision(precision, dev)
    return Engine(dev, chosen, channels_last, compile, why)


class TrainStep:
    """One optimisation step: forward under autocast, backward, optimizer update.

    Returns the loss (fp32, detached) and the number of correct top-1 predictions, both as
    device tensors, so the loop never waits on the device mid-epoch.

    ``accumulate`` N > 1 (``--grad-accum``) runs the batch as N chunks, each backward adding to
    the gradients, then one update: each chunk's summed loss is divided by the whole batch's
    count (or class-weight sum), so the gradients are the whole batch's to float rounding,
    BatchNorm aside (it normalises each chunk by its own statistics). Under torchrun the
    chunks before the last skip DistributedDataParallel's all-reduce (``no_sync``).

    ``mix`` (``training/mixing.py``): a mixed batch's loss is ``lam`` of the loss against its
    labels plus ``1 - lam`` of the loss against the partners' labels.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: nn.Module, engine: Engine, accumulate: int = 1) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.engine = engine
        self.scaler = engine.make_scaler()
        self.accumulate = accumulate

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 mix: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        chunks = min(self.accumulate, len(labels))
        partner, lam = (mix.partner, mix.lam) if mix is not None else (None, 1.0)
        if chunks == 1:
            loss, correct = self._forward_backward(images, labels, partner, lam, None)
        else:
            loss, correct = self._accumulate(images, labels, partner, lam, chunks)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss, correct

    def _accumulate(self, images: torch.Tensor, labels: torch.Tensor,
                    partner: torch.Tensor | None, lam: float, chunks: int):
        weight = getattr(self.loss_fn, "weight", None)

        def total(y: torch.Tensor | None):
            return None if y is None else weight[y].sum() if weight is not None else float(len(y))

        totals = (total(labels), total(partner))
        loss = correct = 0
        parts = [t.tensor_split(chunks) if t is not None else [None] * chunks
                 for t in (images, labels, partner)]
        for i, (x, y, z) in enumerate(zip(*parts)):
            quiet = i < chunks - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if quiet else contextlib.nullcontext():
                part_loss, part_correct = self._forward_backward(x, y, z, lam, totals)
            loss, correct = loss + part_loss, correct + part_correct
        return loss, correct

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, total) -> torch.Tensor:
        """The batch's loss, or a chunk's summed loss / ``total`` (the whole batch's count)."""
        if total is None:
            return self.loss_fn(logits, labels)
        return nn.functional.cross_entropy(
            logits, labels, weight=getattr(self.loss_fn, "weight", None),
            label_smoothing=self.loss_fn.label_smoothing, reduction="sum") / total

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor,
                          partner: torch.Tensor | None, lam: float,
                          totals: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and backward of one batch, or of one chunk (``totals``: the whole batch's)."""
        own, other = totals if totals is not None else (None, None)
        with self.engine.autocast():
            logits = self.model(images).float()
            loss = self._loss(logits, labels, own)
            if partner is not None:
                loss = lam * loss + (1 - lam) * self._loss(logits, partner, other)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        major = labels if partner is None or lam >= 0.5 else partner
        correct = (logits.detach().argmax(1) == major).sum()
        return loss.detach().float(), correct


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, engine: Engine) -> torch.Tensor:
    with engine.autocast():
        return model(images).float()
