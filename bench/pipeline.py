"""Input-pipeline cost: producing an augmented batch against a VGG-16-BN training step.

The loader's batch (gather from the resident uint8 dataset, random crop with reflect padding,
horizontal flip, cutout, conversion and normalisation, in the engine's memory format) is timed
against one training step of VGG-16-BN (forward + backward + SGD-Nesterov update, vggkit's
engine) on a batch of the same size, on the same device, alternating window by window so that
swings in the host's speed hit both alike. The figure is the median batch time as a share of
the median step time; the target is under 5%.

    python bench/pipeline.py                       # random CIFAR-sized data, auto device
    python bench/pipeline.py --data folder:../shared/data/cifar10-jpg.zip
    python bench/pipeline.py --record              # write the result into docs/data.md

The pixel values do not change the cost, so random data is the default (no decoding needed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from vggkit.data import Augment, Loader, load_dataset  # noqa: E402

DOC = C.ROOT / "docs" / "data.md"


def batch_source(loader: Loader):
    """A callable returning the next batch, moving to the next epoch when one ends (so the
    per-epoch permutation and parameter draws are part of the measured cost)."""
    state = {"epoch": 0, "it": iter(loader.epoch(0))}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = iter(loader.epoch(state["epoch"]))
            return next(state["it"])

    return next_batch


def training_step(args, engine, batch: int):
    """One VGG-16-BN step as the trainer runs it (falls back to a plain eager step if the
    training engine is unavailable)."""
    from vggkit.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg16_bn", num_classes=10)
    opt_args = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    try:
        from vggkit.training.engine import TrainStep

        model = engine.prepare(model)
        model.train()
        step = TrainStep(model, torch.optim.SGD(model.parameters(), **opt_args), nn.CrossEntropyLoss(), engine)
        xd, yd = engine.to_input(x), y.to(engine.device)
        return lambda: step(xd, yd)
    except ImportError:  # pragma: no cover - engine not present
        model.train()
        opt = torch.optim.SGD(model.parameters(), **opt_args)

        def plain():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return plain


def record(body: str) -> None:
    """Replace the generated block between the pipeline markers in docs/data.md."""
    begin, end = "<!-- bench:pipeline:begin -->", "<!-- bench:pipeline:end -->"
    text = DOC.read_text() if DOC.exists() else "# Data\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## Pipeline benchmark\n\n{block}\n"
    DOC.write_text(text)
    print(f"recorded in {DOC.relative_to(C.ROOT)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="training steps per window")
    p.add_argument("--batches", type=int, default=20, help="loader batches per window")
    p.add_argument("--data", default=None, help="a dataset name to load instead of random CIFAR-sized data")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--record", action="store_true", help="write the result into docs/data.md")
    args = p.parse_args()

    from vggkit.training.engine import make_engine

    engine = make_engine(args.device, args.precision, channels_last=True, compile=False)
    if args.data:
        ds = load_dataset(args.data, data_dir=args.data_dir, progress=False)
        x, y, mean, std = ds.x_train, ds.y_train, ds.mean, ds.std
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (50_000,), generator=g)
        mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    common = dict(shuffle=True, seed=0, mean=mean, std=std, device=engine.device,
                  channels_last=engine.channels_last)
    full = Augment(crop_padding=4, pad_mode="reflect", flip=True, cutout=8)
    loaders = {
        "augmented batch (crop 4 reflect + flip + cutout 8)": Loader(x, y, args.batch, augment=full, **common),
        "plain batch (gather + normalise)": Loader(x, y, args.batch, **common),
    }
    step = training_step(args, engine, args.batch)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    variants = {name: batch_source(ld) for name, ld in loaders.items()}
    for fn in variants.values():  # warm-up (allocator, first-epoch setup)
        for _ in range(3):
            fn()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    step()
    sync()

    # Alternate within each window: every loader variant, then the training step, so that the
    # host's speed swings (shared machine) affect both sides of the ratio alike.
    batch_times: dict[str, list[float]] = {k: [] for k in variants}
    step_times: list[float] = []
    for _ in range(args.windows):
        for name, t in C.interleave(variants, 1, args.batches, sync).items():
            batch_times[name] += t
        step_times += C.interleave({"step": step}, 1, args.steps, sync)["step"]

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ts = C.median(step_times)
    rows = [[name, f"{C.median(t) * 1e3:.2f}", f"{C.median(t) / ts:.2%}"] for name, t in batch_times.items()]
    rows.append(["VGG-16-BN training step (vggkit engine)", f"{ts * 1e3:.1f}", "100%"])
    table = C.markdown_table([f"per batch of {args.batch} CIFAR images", "median ms", "share of a training step"], rows)
    print(table)
    body = (f"Command: `{C.command_line()}`\n\n"
            f"Machine: {C.machine_line()}\n\n"
            f"Engine: {engine.describe()}; first step {first:.1f} s (warm-up, not counted).\n\n"
            f"Medians over {args.windows} alternating windows, each {args.batches} batches of every loader "
            f"variant then {args.steps} training step(s). Host load average {load_before:.1f} before, "
            f"{load_after:.1f} after (shared host: absolute times swing with it, the ratio much less)."
            f"\n\n{table}\n")
    if args.record:
        record(body)


if __name__ == "__main__":
    main()
