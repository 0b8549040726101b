"""Device, precision and the compiled training step: the one place where the speed
decisions live (summary.json reports what they chose)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from vggkit.errors import UsageError

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
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
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return ("bf16", "CUDA device supports bf16") if bf16_ok else (
                "fp16", "CUDA device without bf16: fp16 autocast with loss scaling")
        if precision == "bf16" and not bf16_ok:
            raise UsageError("--precision bf16: this CUDA device does not support bf16")
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


@dataclass
class Engine:
    """How tensors are laid out and computed; built once per run."""

    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    channels_last: bool = True
    compile: bool = False
    precision_reason: str = ""

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

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device, memory_format=self.memory_format)
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
            "threads": torch.get_num_threads(),
        }


def make_engine(device: str, precision: str, channels_last: bool, compile: bool,
                threads: int | None = None) -> Engine:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    chosen, why = resolve_precision(precision, dev)
    return Engine(dev, chosen, channels_last, compile, why)


class TrainStep:
    """One optimisation step: forward under autocast, backward, optimizer update.

    Returns the loss (fp32, detached) and the number of correct top-1 predictions, both as
    device tensors, so the loop never waits on the device mid-epoch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: nn.Module, engine: Engine) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.engine = engine
        self.scaler = engine.make_scaler()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with self.engine.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits.float(), labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss.detach().float(), correct


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, engine: Engine) -> torch.Tensor:
    with engine.autocast():
        return model(images).float()


def allocator_env_hint() -> dict[str, str]:
    """Environment settings of glibc's allocator that were measured to speed up training
    on CPU (see docs/benchmarks.md); applied by the CLI before torch allocates."""
    return {k: os.environ.get(k, "") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
