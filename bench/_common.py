"""Shared helpers for vggkit's benchmarks: machine facts, FLOP counts, interleaved timing and
recording a result section in docs/benchmarks.md.

The host these run on is shared and its speed swings (up to 3x within minutes), so every
benchmark alternates the variants it compares in one process and reports medians of several
windows; compare ratios from one run, never absolute numbers across runs.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine_line() -> str:
    import torch

    from vggkit.training.engine import cpu_flags, cpu_name

    flags = sorted(f for f in cpu_flags() if re.match(r"(amx|avx512_bf16|avx512_vnni|avx512f$|avx2$)", f))
    cpu = f"{cpu_name()}{amd_generation()}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none of note'}"
    gpu = ""
    if torch.cuda.is_available():
        gpu = f"; GPU: {torch.cuda.get_device_name(0)}"
    return (f"{cpu}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}")


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [rel, *sys.argv[1:]])


def conv_train_flops(model, input_shape) -> tuple[float, float]:
    """(forward FLOPs, training-step FLOPs) per image, counting convolutions and dense layers
    (2 per multiply-add). A training step is forward + backward-data + backward-weights; a
    layer computes no gradient for its input before the first layer with a trainable weight
    (the first layer; with frozen features, the head's first), and none for a frozen weight."""
    import torch
    from torch import nn

    fwd: list[tuple[float, int]] = []  # (forward FLOPs, backward passes: data and/or weights)
    seen_trainable = [False]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            f = 2.0 * out[0].numel() * k
        else:
            f = 2.0 * mod.in_features * mod.out_features
        trainable = mod.weight.requires_grad
        fwd.append((f, int(seen_trainable[0]) + int(trainable)))
        seen_trainable[0] |= trainable

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    model.train(was_training)
    for h in handles:
        h.remove()
    forward = sum(f for f, _ in fwd)
    train = sum(f * (1 + backward) for f, backward in fwd)
    return forward, train


def interleave(variants: dict[str, Callable[[], object]], windows: int, per_window: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``windows`` rounds, each timing ``per_window`` calls
    of every variant in turn (so slow and fast phases of the host hit all variants alike)."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(windows):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(per_window):
                fn()
            sync()
            out[name].append((time.perf_counter() - t0) / per_window)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def amd_family() -> str:
    from vggkit.training.engine import cpu_info

    return cpu_info("cpu family") if cpu_info("vendor_id") == "AuthenticAMD" else ""


def amd_generation() -> str:
    """' (Zen 5, family 26)' and the like for AMD EPYCs, whose model name says neither: family 25
    runs AVX-512 on 256-bit halves, family 26 on full 512-bit pipes (twice the bf16 peak per clock)."""
    family = amd_family()
    if not family:
        return ""
    return {"25": " (Zen 3/4, family 25)", "26": " (Zen 5, family 26)"}.get(family, f" (family {family})")


def machine_kind() -> str:
    """The kind of CPU the development pool draws, as it matters for speed: AMX tiles, AVX512-BF16
    alone on 256-bit halves (Zen 4) or on full 512-bit pipes (Zen 5), or neither (fp32). Recorded
    blocks are kept per kind, so a run on one kind never overwrites another kind's figures."""
    from vggkit.training.engine import cpu_flags

    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx-bf16"
    if "avx512_bf16" not in flags:
        return "fp32-only"
    return "zen5-avx512-bf16" if amd_family() == "26" else "avx512-bf16"


def record(section: str, body: str) -> None:
    """Replace (or add) the generated block for ``section`` on this kind of CPU in
    docs/benchmarks.md, between ``<!-- bench:section.kind:begin -->`` and
    ``<!-- bench:section.kind:end -->`` markers; prose around the markers is left as written.
    A kind's first block goes right after the same section's blocks of other kinds."""
    section = f"{section}.{machine_kind()}"
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        base = section.rsplit(".", 1)[0]
        others = list(re.finditer(rf"<!-- bench:{re.escape(base)}\.[\w-]+:end -->", text))
        if others:
            at = others[-1].end()
            text = text[:at] + f"\n\n{block}" + text[at:]
        else:
            text = text.rstrip() + f"\n\n## {base}\n\n{block}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"recorded in {os.path.relpath(DOC, ROOT)} (section {section})")
