"""What the regularisers add to a VGG-16-BN training step (issue 29: each under 5%).

One VGG-16-BN step (bf16 where the CPU has it, channels_last, batch 256 of 3x32x32, the
fused SGD step) is timed beside, in the same windows:

* ``--auto-augment trivial`` and ``rand-m9-n2``: building a loader batch with the policy
  minus building it without (crop, flip and normalisation in both);
* ``--mixup 0.8`` and ``--cutmix 1.0``: mixing the batch in place;
* ``--ema 0.9998``: one update of the average (every float entry of the state dict).

    python bench/regularisers.py [--batch 256] [--windows 5] [--record]

Prints milliseconds (median of the windows) and each as a share of the step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from vggkit.config import TrainConfig  # noqa: E402
from vggkit.data.loader import Augment, Loader  # noqa: E402
from vggkit.models import create_model  # noqa: E402
from vggkit.training.ema import WeightEMA  # noqa: E402
from vggkit.training.engine import TrainStep, make_engine  # noqa: E402
from vggkit.training.mixing import Mixing  # noqa: E402
from vggkit.training.optim import build_optimizer  # noqa: E402


def batch_builder(images, labels, batch: int, policy: str):
    """A callable that builds the next training batch (cycling an epoch) with ``policy``."""
    aug = Augment(crop_padding=4, flip=True, auto_augment=policy)
    loader = Loader(images, labels, batch, shuffle=True, mean=[0.5] * 3, std=[0.25] * 3,
                    augment=aug, channels_last=True)
    state = {"it": iter(()), "epoch": 0}

    def build():
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = loader.epoch(state["epoch"])
            return next(state["it"])
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    load_start = os.getloadavg()
    engine = make_engine("cpu", "auto", True, False, args.threads)
    config = TrainConfig(model="vgg16_bn", head="linear", lr=0.1, weight_decay=5e-4)
    model = engine.prepare(create_model("vgg16_bn", num_classes=10, in_channels=3,
                                        input_size=32, head="linear"))
    step = TrainStep(model, build_optimizer(model, config, 0.1), nn.CrossEntropyLoss(), engine)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8 * args.batch, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (8 * args.batch,), generator=gen)
    x, y = batch_builder(images, labels, args.batch, "")()
    ema = WeightEMA(model, 0.9998)
    mixers = {"mixup": Mixing(mixup=0.8), "cutmix": Mixing(cutmix=1.0)}
    counter = {"step": 0}

    def mixed(kind):
        def run():
            counter["step"] += 1
            mixers[kind](x.clone(), y, counter["step"])
        return run

    variants = {
        "step": lambda: step(x, y),
        "batch": batch_builder(images, labels, args.batch, ""),
        "batch_trivial": batch_builder(images, labels, args.batch, "trivial"),
        "batch_rand": batch_builder(images, labels, args.batch, "rand-m9-n2"),
        "clone": lambda: x.clone(),
        "mixup": mixed("mixup"),
        "cutmix": mixed("cutmix"),
        "ema": lambda: ema.update(10_000),
    }
    for fn in variants.values():  # warm-up
        fn()
    seconds = C.interleave(variants, args.windows, 3)
    ms = {k: 1000 * C.median(v) for k, v in seconds.items()}
    costs = {
        "--auto-augment trivial": ms["batch_trivial"] - ms["batch"],
        "--auto-augment rand-m9-n2": ms["batch_rand"] - ms["batch"],
        "--mixup 0.8": ms["mixup"] - ms["clone"],
        "--cutmix 1.0": ms["cutmix"] - ms["clone"],
        "--ema 0.9998": ms["ema"],
    }
    load_end = os.getloadavg()
    rows = [[name, f"{cost:.2f}", f"{100 * cost / ms['step']:.2f}%",
             "yes" if cost < 0.05 * ms["step"] else "NO"] for name, cost in costs.items()]
    body = "\n".join([
        f"Command: `{C.command_line()}`",
        "",
        f"Machine: {C.machine_line()}; load {load_start[0]:.2f} -> {load_end[0]:.2f}.",
        "",
        f"VGG-16-BN training step, batch {args.batch} of 3x32x32, {engine.precision}: "
        f"**{ms['step']:.1f} ms** (the loader batch without a policy: {ms['batch']:.1f} ms).",
        "",
        C.markdown_table(["what", "added ms per step", "share of the step", "under 5%"], rows),
    ])
    print(body)
    if args.record:
        C.record("regularisers", body)


if __name__ == "__main__":
    main()
