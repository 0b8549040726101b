"""The optimizer step alone: torch's per-parameter loop, its foreach variant and the fused
kernel vggkit uses (``build_optimizer``), for SGD (Nesterov, weight decay) and AdamW, on the
classic VGG-16 (33.6 M parameters, the write-up's dense head) and VGG-16-BN (15.0 M).

    python bench/optimizer_step.py [--threads 2] [--steps 10]

Prints milliseconds per step (median of ``--steps``, after two warm-up steps) and the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vggkit.models import create_model
from vggkit.training.engine import cpu_name

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(optimizer: torch.optim.Optimizer, steps: int) -> float:
    optimizer.step()
    optimizer.step()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| network | optimizer | loop ms | foreach ms | fused ms | fused speed-up |")
    print("|---|---|---|---|---|---|")
    for name, head in (("vgg16", "classic"), ("vgg16_bn", None)):
        model = create_model(name, num_classes=10, in_channels=3, input_size=32, head=head)
        model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for opt_name in ("sgd", "adamw"):
            ms = {}
            for variant, kw in VARIANTS.items():
                if opt_name == "sgd":
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                          nesterov=True, weight_decay=5e-4, **kw)
                else:
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kw)
                ms[variant] = step_ms(opt, args.steps)
            print(f"| {name} | {opt_name} | {ms['loop']:.1f} | {ms['foreach']:.1f} | "
                  f"{ms['fused']:.1f} | {ms['loop'] / ms['fused']:.1f}x |")
    print(f"load at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
