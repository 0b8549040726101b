"""airbench94's published recipe, re-implemented standalone in plain PyTorch, as the
side-by-side reference for ``vggkit train --recipe fast-cifar10`` (docs/benchmarks.md).

A port of the recipe of KellerJordan/cifar10-airbench ``airbench94.py`` (Jordan 2024), written
here from its description, not vggkit's trainer: its own network code, its own loop, summed loss
with airbench's un-decoupled SGD rates, 9.9 epochs (476 steps at batch 1024, last partial batch
dropped), *alternating* flips (a random half flipped once, then every image flipped on odd
epochs), 2-pixel reflect-padded translation, the triangle schedule, lookahead averaging, the
whitening stem from the first 5,000 training images with its bias trained for 3 epochs, and
flip + translate TTA. The only change for a CPU is bf16 autocast with channels_last in place of
fp16 on CUDA (``--precision fp32`` for plain fp32). vggkit is used only to read the dataset.

Timing follows airbench: the clock covers the whitening init, the training epochs and the
final TTA evaluation, not the per-epoch test evaluations.

    python bench/airbench_reference.py --dataset folder:../shared/data/cifar10-jpg.zip \
        --seeds 0 --json /tmp/airbench-ref.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HYP = dict(epochs=9.9, batch_size=1024, lr=11.5, momentum=0.85, weight_decay=0.0153,
           bias_scaler=64.0, label_smoothing=0.2, ema_start=3, ema_base=0.95, ema_pow=3.0,
           ema_every=5, whiten_bias_epochs=3, translate=2, bn_momentum=0.6, widths=(64, 256, 256),
           logit_scale=1 / 9, whiten_kernel=2, whiten_images=5000, whiten_eps=5e-4)


# ----------------------------------------------------------------------------- network
class GroupBN(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale and a learnt shift, airbench's settings."""

    def __init__(self, width: int) -> None:
        super().__init__(width, eps=1e-12, momentum=1 - HYP["bn_momentum"])
        self.weight.requires_grad_(False)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:cin])  # the first C_in filters pass the input through
    return conv


class Group(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(conv3x3(cin, cout), nn.MaxPool2d(2), GroupBN(cout), nn.GELU(),
                         conv3x3(cout, cout), GroupBN(cout), nn.GELU())


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def make_net(channels: int = 3, classes: int = 10) -> nn.Sequential:
    k = HYP["whiten_kernel"]
    stem = nn.Conv2d(channels, 2 * channels * k * k, k, padding=0, bias=True)
    stem.weight.requires_grad_(False)
    w1, w2, w3 = HYP["widths"]
    return nn.Sequential(stem, nn.GELU(), Group(stem.out_channels, w1), Group(w1, w2),
                         Group(w2, w3), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(w3, classes, bias=False), Scale(HYP["logit_scale"]))


@torch.no_grad()
def whiten_(stem: nn.Conv2d, images: torch.Tensor) -> None:
    k = stem.kernel_size[0]
    cols = F.unfold(images.double(), k).transpose(1, 2).reshape(-1, stem.in_channels * k * k)
    cov = cols.T @ cols / len(cols)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.T.flip(0)
    w = evecs / torch.sqrt(evals + HYP["whiten_eps"])[:, None]
    stem.weight.copy_(torch.cat([w, -w]).view_as(stem.weight).float())


# ----------------------------------------------------------------------------- data
def batches(images, labels, epoch, gen, pre_flipped, batch_size, pad):
    """One epoch: translate (reflect pad, random crop), alternating flip, shuffle, drop last."""
    n, _, h, w = images.shape
    if pad:
        padded = F.pad(pre_flipped, (pad,) * 4, mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
        x = x.gather(3, cols)
    else:
        x = pre_flipped
    if epoch % 2 == 1:
        x = x.flip(-1)
    order = torch.randperm(n, generator=gen)
    for i in range(n // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx].contiguous(memory_format=torch.channels_last), labels[idx]


# ----------------------------------------------------------------------------- run
def run(ds, seed: int, epochs: float, precision: str, log=print) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean = ds.x_train.float().mean((0, 2, 3), keepdim=True) / 255
    std = (ds.x_train.float() / 255).std((0, 2, 3), keepdim=True)
    norm = lambda u8: ((u8.float() / 255) - mean) / std  # noqa: E731
    train_x, train_y = norm(ds.x_train), ds.y_train.long()
    test_x, test_y = norm(ds.x_test), ds.y_test.long()
    bs = HYP["batch_size"]
    steps_per_epoch = len(train_x) // bs
    total = math.ceil(steps_per_epoch * epochs)
    kilostep = 1024 * (1 + 1 / (1 - HYP["momentum"]))
    lr = HYP["lr"] / kilostep
    wd = HYP["weight_decay"] * bs / kilostep
    lr_bias = lr * HYP["bias_scaler"]
    peak = int(0.23 * total)

    def factor(step):  # the triangle: 0.2 -> 1 at 23% -> 0.07
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return 1 + (0.07 - 1) * (step - peak) / max(1, total - peak)

    net = make_net(train_x.shape[1], int(train_y.max()) + 1).to(memory_format=torch.channels_last)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    bn = [p for k, p in named if isinstance(net.get_submodule(k.rsplit(".", 1)[0]), GroupBN)]
    other = [p for k, p in named if all(p is not q for q in bn)]
    opt = torch.optim.SGD([dict(params=bn, lr=lr_bias, weight_decay=wd / lr_bias),
                           dict(params=other, lr=lr, weight_decay=wd / lr)],
                          momentum=HYP["momentum"], nesterov=True)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")

    clock = time.perf_counter()
    whiten_(net[0], train_x[:HYP["whiten_images"]])
    flip_half = torch.rand(len(train_x), generator=gen) < 0.5
    pre_flipped = torch.where(flip_half[:, None, None, None], train_x.flip(-1), train_x)
    elapsed = time.perf_counter() - clock
    ema, step, history = None, 0, []
    for epoch in range(math.ceil(epochs)):
        clock = time.perf_counter()
        net[0].bias.requires_grad_(epoch < HYP["whiten_bias_epochs"])
        net.train()
        for x, y in batches(train_x, train_y, epoch, gen, pre_flipped, bs, HYP["translate"]):
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor(step)
            with autocast:
                loss = loss_fn(net(x).float(), y).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if epoch >= HYP["ema_start"] and step % HYP["ema_every"] == 0:
                live = [v for v in net.state_dict().values() if v.is_floating_point()]
                if ema is None:
                    ema = [v.clone() for v in live]
                else:
                    rho = HYP["ema_base"] ** HYP["ema_every"] * (step / total) ** HYP["ema_pow"]
                    with torch.no_grad():
                        for a, v in zip(ema, live):
                            a.lerp_(v, 1 - rho)
                            v.copy_(a)
            if step >= total:
                break
        if ema is not None:
            with torch.no_grad():
                live = [v for v in net.state_dict().values() if v.is_floating_point()]
                for a, v in zip(ema, live):
                    v.copy_(a)
        elapsed += time.perf_counter() - clock
        acc = evaluate(net, test_x, test_y, autocast, tta=0)
        history.append({"epoch": epoch + 1, "steps": step, "val_acc": acc,
                        "elapsed_seconds": elapsed})
        log(f"seed {seed} epoch {epoch + 1}: test acc {100 * acc:.2f}% (no TTA)  "
            f"{elapsed:.1f}s of training")
    clock = time.perf_counter()
    tta_acc = evaluate(net, test_x, test_y, autocast, tta=2)
    elapsed += time.perf_counter() - clock
    log(f"seed {seed}: test acc {100 * tta_acc:.2f}% with flip+translate TTA, {elapsed:.1f}s")
    return {"seed": seed, "tta_acc": tta_acc, "seconds": elapsed, "history": history,
            "steps": step, "precision": precision}


@torch.no_grad()
def evaluate(net, x, y, autocast, tta: int, batch: int = 1000) -> float:
    net.eval()

    def logits(v):
        with autocast:
            return net(v.contiguous(memory_format=torch.channels_last)).float()

    def mirror(v):
        return 0.5 * (logits(v) + logits(v.flip(-1)))

    correct = 0
    for i in range(0, len(x), batch):
        v = x[i:i + batch]
        if tta == 0:
            out = logits(v)
        else:
            out = mirror(v)
            if tta == 2:
                p = F.pad(v, (1, 1, 1, 1), mode="reflect")
                h, w = v.shape[-2:]
                out = 0.5 * out + 0.25 * (mirror(p[:, :, :h, :w]) + mirror(p[:, :, 2:, 2:]))
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def plot(runs: list[str], refs: list[str], png: str) -> None:
    """Test accuracy against training seconds: vggkit run folders (metrics.jsonl, plus the
    final TTA accuracy from summary.json) and this script's JSON results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for folder in runs:
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        t = [r["elapsed_seconds"] for r in rows]
        a = [100 * r["val_acc"] for r in rows]
        line, = ax.plot(t, a, "o-", label=f"vggkit fast-cifar10 ({Path(folder).name})")
        summary = Path(folder) / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            # Timed as airbench times itself: training plus the final TTA evaluation.
            ax.plot([s["train_seconds"] + s.get("test_seconds", 0.0)], [100 * s["test_acc"]], "*", ms=12, color=line.get_color(),
                    label=f"  final, flip+translate TTA {100 * s['test_acc']:.2f}%")
    for path in refs:
        for r in json.loads(Path(path).read_text())["runs"]:
            t = [h["elapsed_seconds"] for h in r["history"]]
            a = [100 * h["val_acc"] for h in r["history"]]
            line, = ax.plot(t, a, "s--", label=f"airbench94 reference (seed {r['seed']})")
            ax.plot([r["seconds"]], [100 * r["tta_acc"]], "*", ms=12, color=line.get_color())
    ax.axhline(94, color="grey", lw=0.8, ls=":")
    ax.axvline(300, color="red", lw=0.8, ls=":", label="5 minutes")
    ax.set_xlabel("seconds of training (stars: + final TTA evaluation); 2-core Zen 4, bf16, shared host")
    ax.set_ylabel("CIFAR-10 JPEG copy test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="folder:../shared/data/cifar10-jpg.zip")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    ap.add_argument("--epochs", type=float, default=HYP["epochs"])
    ap.add_argument("--batch-size", type=int, default=HYP["batch_size"])
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--subset", type=int, default=None, help="train on N images (smoke tests)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", nargs="*", metavar="RUN_DIR", default=None,
                    help="instead of training: plot these vggkit runs (and --ref JSONs)")
    ap.add_argument("--ref", nargs="*", default=[], help="with --plot: this script's JSONs")
    ap.add_argument("--png", default="docs/fast-cifar10-curve.png")
    args = ap.parse_args(argv)
    if args.plot is not None:
        plot(args.plot, args.ref, args.png)
        return 0
    from vggkit.data import load_dataset

    HYP["batch_size"] = args.batch_size
    # airbench trains on all 50,000 training images: no validation split
    ds = load_dataset(args.dataset, data_dir=args.data_dir, subset=args.subset,
                      image_size=args.image_size, val_split=0)
    print(f"{args.dataset}: {len(ds.x_train)} train, {len(ds.x_test)} test, "
          f"{tuple(ds.x_train.shape[1:])}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.precision}", flush=True)
    results = [run(ds, int(s), args.epochs, args.precision, log=lambda m: print(m, flush=True))
               for s in args.seeds.split(",")]
    accs = torch.tensor([r["tta_acc"] for r in results])
    print(f"mean TTA test accuracy {100 * accs.mean():.2f}% over {len(accs)} run(s); "
          f"mean time {sum(r['seconds'] for r in results) / len(results):.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "hyp": HYP,
                                               "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
