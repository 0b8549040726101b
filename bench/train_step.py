"""Training-step throughput: vggkit's engine against a plain PyTorch eager fp32 loop.

For each network, one step = forward + backward + SGD-Nesterov update on a fixed batch of
random 3x32x32 images (10 classes; --image-size N for NxN, --freeze-features for the
fine-tuning step: features frozen, backward through the head alone). The two loops run in the same process, alternating
window by window; the table gives the median images/s of the windows, the achieved TFLOP/s
(convolution + dense FLOPs of forward, backward-data and backward-weights) and that as a
fraction of the bf16 3x3-convolution peak measured in the same process.

    python bench/train_step.py --quick     # vgg16_bn + compact, < 3 minutes
    python bench/train_step.py             # every network of NETS
    python bench/train_step.py --profile vgg16_bn   # where the step time goes
    python bench/train_step.py --nets vgg16_bn --image-size 224 --freeze-features
    python bench/train_step.py --freeze-compare --nets vgg16_bn --image-size 224 --batch 16
    python bench/train_step.py --fused-compare          # fused BatchNorm + ReLU, A/B/C
    python bench/train_step.py --memory --nets vgg16_bn --image-size 224 --batch 32  # peak RSS
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from vggkit.models import create_model  # noqa: E402
from vggkit.training.engine import TrainStep, make_engine, predict_logits  # noqa: E402
from vggkit.training.finetune import freeze_features  # noqa: E402

NETS = {
    "vgg11_bn": ("vgg11_bn", "linear"),
    "vgg16_bn": ("vgg16_bn", "linear"),
    "vgg19_bn": ("vgg19_bn", "linear"),
    "vgg_compact": ("vgg_compact", "compact"),
    "vgg_airbench": ("vgg_airbench", "airbench"),  # fast-cifar10's net (its stem random here)
    "vgg16_bn+4096": ("vgg16_bn", "classic"),
    "vgg16": ("vgg16", "classic"),  # no BatchNorm: the photos goal's second network
}

SMALL = ("vgg_compact", "vgg_airbench")  # steps of a few ms: each window times more of them


def conv_peak(dtype: torch.dtype, batch: int = 256) -> float:
    """Best TFLOP/s of one 3x3 convolution forward (256 -> 256 channels at 8x8, channels_last)
    over a few tries: the reference for 'fraction of peak'."""
    x = torch.randn(batch, 256, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    flops = 2 * batch * 256 * 256 * 9 * 64
    best = float("inf")
    with torch.no_grad():
        for _ in range(6):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e12


def build(name: str, seed: int = 0, size: int = 32, freeze: bool = False) -> nn.Module:
    """``freeze``: the features frozen as --freeze-features does (no gradient through them,
    their BatchNorm in eval mode)."""
    arch, head = NETS[name]
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, head=head, input_size=size)
    if freeze:
        freeze_features(model)
    return model


def plain_fp32_loop(name: str, batch: int, size: int = 32, freeze: bool = False):
    """The loop a PyTorch tutorial writes: eager, fp32, NCHW."""
    return _plain_loop(name, batch, bf16=False, size=size, freeze=freeze)


def plain_bf16_loop(name: str, batch: int, size: int = 32, freeze: bool = False):
    """What the PyTorch performance guide adds by hand: bf16 autocast + channels_last, stock
    modules, eager (no FastConv2d, no allocator settings)."""
    return _plain_loop(name, batch, bf16=True, size=size, freeze=freeze)


def _plain_loop(name: str, batch: int, bf16: bool, size: int = 32, freeze: bool = False):
    layout = torch.channels_last if bf16 else torch.contiguous_format
    model = build(name, size=size, freeze=freeze).to(memory_format=layout)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def vggkit_loop(name: str, batch: int, args, fuse_bn: bool = True):
    engine = make_engine("cpu", args.precision, channels_last=True, compile=args.compile,
                         threads=args.threads)
    engine.fuse_bn = fuse_bn
    size, freeze = getattr(args, "image_size", 32), getattr(args, "freeze_features", False)
    model = engine.prepare(build(name, size=size, freeze=freeze))
    model = engine.maybe_compile(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = TrainStep(model, opt, nn.CrossEntropyLoss(), engine)
    g = torch.Generator().manual_seed(1)
    x = engine.to_input(torch.randn(batch, 3, size, size, generator=g))
    y = torch.randint(0, 10, (batch,), generator=g)
    return (lambda: step(x, y)), engine


def run(args) -> None:
    names = args.nets or (["vgg16_bn", "vgg_compact"] if args.quick else list(NETS))
    windows = args.windows or (3 if args.quick else 5)
    peak_bf16 = conv_peak(torch.bfloat16)
    peak_fp32 = conv_peak(torch.float32)
    rows = []
    engine_desc = None
    for name in names:
        steps = 1 if (name not in SMALL and args.quick) else 2
        if name in SMALL:
            steps *= 4
        base = plain_fp32_loop(name, args.batch, args.image_size, args.freeze_features)
        fast, engine = vggkit_loop(name, args.batch, args)
        engine_desc = engine.describe()
        t0 = time.perf_counter()
        fast()  # warm-up (and compilation, when compiling)
        warm = time.perf_counter() - t0
        fast()
        base()
        times = C.interleave({"vggkit": fast, "plain": base}, windows, steps)
        tv, tb = C.median(times["vggkit"]), C.median(times["plain"])
        _, train_flops = C.conv_train_flops(
            build(name, size=args.image_size, freeze=args.freeze_features),
            (3, args.image_size, args.image_size))
        tflops = train_flops * args.batch / tv / 1e12
        peak = peak_bf16 if engine.precision == "bf16" else peak_fp32
        row = [name, f"{args.batch / tb:,.0f}", f"{args.batch / tv:,.0f}", f"{tb / tv:.2f}x",
               f"{train_flops / 1e9:.2f}", f"{tflops:.3f}", f"{tflops / peak:.0%}", f"{warm:.1f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    peak_bf16 = max(peak_bf16, conv_peak(torch.bfloat16))
    header = ["network", "plain fp32 eager img/s", "vggkit img/s", "ratio", "train GFLOP/img",
              "vggkit TFLOP/s", "of conv peak", "first step s"]
    table = C.markdown_table(header, rows)
    print(table)
    body = (f"Command: `{C.command_line()}`\n\n"
            f"Machine: {C.machine_line()}\n\n"
            f"vggkit engine: {engine_desc}\n\n"
            f"Batch {args.batch}, 3x{args.image_size}x{args.image_size}, 10 classes, "
            f"SGD-Nesterov{'; features frozen (--freeze-features)' if args.freeze_features else ''}; "
            f"median of {windows} "
            f"alternating windows. Measured 3x3-conv peak in this run (256ch at 8x8, batch 256, "
            f"forward): bf16 {peak_bf16:.2f} TFLOP/s, fp32 {peak_fp32:.2f} TFLOP/s.\n\n{table}\n")
    if args.record:
        variant = (f"_{args.image_size}px" if args.image_size != 32 else "") + \
            ("_frozen" if args.freeze_features else "")
        C.record("train_step" + variant + ("_quick" if args.quick else ""), body)


def freeze_compare(args) -> None:
    """The fine-tuning step's speed-up: vggkit's step with the features frozen against the same
    step training everything, alternating window by window in one process."""
    import copy

    names, windows, rows = args.nets or ["vgg16_bn"], args.windows or 5, []
    for name in names:
        loops = {}
        for frozen in (False, True):
            a = copy.copy(args)
            a.freeze_features = frozen
            loops["frozen" if frozen else "full"], engine = vggkit_loop(name, args.batch, a)
        for loop in loops.values():
            loop(), loop()  # warm-up
        times = C.interleave(loops, windows, 1)
        full, frozen = C.median(times["full"]), C.median(times["frozen"])
        rows.append([name, f"{args.batch / full:,.1f}", f"{args.batch / frozen:,.1f}",
                     f"{full / frozen:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    record_compare(args, f"train_step_freeze_{args.image_size}px",
                   ["network", "all layers trained img/s", "features frozen img/s", "speed-up"],
                   rows, f"vggkit engine: {engine.describe()}\n\n",
                   f"median of {windows} alternating windows of one step.")


def record_compare(args, section: str, header: list[str], rows: list[list[str]], engine: str,
                   method: str) -> None:
    """Print a comparison's table and record it with its command, machine and method."""
    table = C.markdown_table(header, rows)
    print(table)
    body = (f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}\n\n{engine}"
            f"Batch {args.batch}, 3x{args.image_size}x{args.image_size}, 10 classes, "
            f"SGD-Nesterov; {method}\n\n{table}\n")
    if args.record:
        C.record(section, body)


def fused_compare(args) -> None:
    """The fused BatchNorm + ReLU (issue 31) against the engine with the stock layers and the
    plain bf16 + channels_last loop, alternating window by window in one process."""
    names, windows, rows = args.nets or ["vgg16_bn", "vgg_compact"], args.windows or 5, []
    peak = conv_peak(torch.bfloat16)
    for name in names:
        size, steps = args.image_size, 4 if name in SMALL else 1
        loops = {"fused": vggkit_loop(name, args.batch, args)[0],
                 "stock": vggkit_loop(name, args.batch, args, fuse_bn=False)[0],
                 "plain": plain_bf16_loop(name, args.batch, size, args.freeze_features)}
        for loop in loops.values():
            loop(), loop()  # warm-up
        times = C.interleave(loops, windows, steps)
        t = {k: C.median(v) for k, v in times.items()}
        _, flops = C.conv_train_flops(build(name, size=size), (3, size, size))
        rows.append([name, *(f"{args.batch / t[k]:,.1f}" for k in ("plain", "stock", "fused")),
                     f"{t['stock'] / t['fused']:.3f}x", f"{t['plain'] / t['fused']:.2f}x",
                     f"{flops * args.batch / t['fused'] / 1e12 / peak:.0%}"])
        print(" | ".join(rows[-1]), flush=True)
    peak = max(peak, conv_peak(torch.bfloat16))
    record_compare(args, f"train_step_fused_bn_{args.image_size}px",
                   ["network", "plain bf16 + channels_last img/s", "engine, stock BN + ReLU img/s",
                    "engine, fused img/s", "fused / stock", "fused / plain", "of conv peak"], rows,
                   "", f"median of {windows} alternating windows. Measured bf16 3x3-conv peak in "
                   f"this run: {peak:.2f} TFLOP/s.")


# --memory: each step kind in a fresh process, so that its peak RSS is its own. "freed memory
# returned" sets glibc's default trim threshold, which turns off the engine's keep_freed_memory.
MEMORY_KINDS = {"plain bf16 + channels_last": ("plain", {}),
                "engine, stock BN + ReLU": ("stock", {}),
                "engine, fused": ("fused", {}),
                "engine, fused, freed memory returned": ("fused", {"MALLOC_TRIM_THRESHOLD_": "131072"})}


def memory_child(args) -> None:
    """One process, one kind of step: build, 2 warm-up steps, then ``--windows`` timed steps;
    prints the median step seconds and the process's peak RSS in MiB."""
    name, kind = (args.nets or ["vgg16_bn"])[0], args.memory_child
    if kind == "plain":
        step = plain_bf16_loop(name, args.batch, args.image_size, args.freeze_features)
    else:
        step = vggkit_loop(name, args.batch, args, fuse_bn=kind == "fused")[0]
    step(), step()
    times = []
    for _ in range(args.windows or 3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"RESULT {C.median(times):.4f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def memory(args) -> None:
    """Peak RSS and step time of each kind of step, each in its own process, one after another."""
    name, rows = (args.nets or ["vgg16_bn"])[0], []
    for label, (kind, env) in MEMORY_KINDS.items():
        cmd = [sys.executable, __file__, "--memory-child", kind, "--nets", name, "--batch",
               str(args.batch), "--image-size", str(args.image_size), "--windows",
               str(args.windows or 3), "--precision", args.precision]
        cmd += ["--freeze-features"] if args.freeze_features else []
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"{label}: the child failed: {out.stderr.strip()[-400:]}")
        seconds, rss = map(float, line[0].split()[1:])
        rows.append([label, f"{rss / 1024:.2f}", f"{args.batch / seconds:,.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    record_compare(args, f"train_step_memory_{args.image_size}px",
                   ["step", "peak RSS GiB", "img/s"], rows, f"Network: {name}.\n\n",
                   f"each kind in a fresh process (2 warm-up steps, median of "
                   f"{args.windows or 3} steps); peak RSS is the process's ru_maxrss.")


def profile(args) -> None:
    """Operator table of a few engine steps, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    name = args.profile
    fast, engine = vggkit_loop(name, args.batch, args)
    for _ in range(2):
        fast()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            fast()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


# The distinct 3x3 convolutions (C_in, C_out, side) of each network at 32x32 input. vgg_airbench's
# stem is a frozen 2x2 convolution, so its first 3x3 layer sees 31x31; each group's first
# convolution runs before its pool.
LAYER_SHAPES = {
    "vgg16": [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
              (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2)],
    "compact": [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16), (64, 128, 8),
                (128, 128, 8)],
    "airbench": [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 3)],
}


def layers(args) -> None:
    """TFLOP/s of each distinct 3x3 convolution of --layer-shapes (bf16, channels_last, batch --batch):
    forward, backward-data, backward-weights (oneDNN) and the matmul weight gradient that
    FastConv2d uses on small maps; variants alternate, median of the windows."""
    import torch.nn.functional as F

    from vggkit.training.engine import conv3x3_weight_grad, keep_freed_memory

    keep_freed_memory()  # as the engine does: no page faults on each large output
    B = args.batch
    shapes = LAYER_SHAPES[args.layer_shapes]
    conv_bwd = torch.ops.aten.convolution_backward
    rows = []
    for ci, co, hw in shapes:
        flops = 2 * B * ci * co * 9 * hw * hw
        x = torch.randn(B, ci, hw, hw, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(co, ci, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        g = torch.randn(B, co, hw, hw, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        args_ = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        v = {"fwd": lambda: F.conv2d(x, w, padding=1),
             "bwd-data": lambda: conv_bwd(g, x, w, None, *args_, [True, False, False]),
             "bwd-weights": lambda: conv_bwd(g, x, w, [co], *args_, [False, True, True]),
             "bwd-weights matmul": lambda: conv3x3_weight_grad(x, g)}
        for f in v.values():
            f()
        t = C.interleave(v, args.windows or 3, 1)
        rows.append([f"{ci}->{co} @{hw}x{hw}", f"{flops / 1e9:.1f}"] +
                    [f"{C.median(t[k]) * 1e3:.1f} ms / {flops / C.median(t[k]) / 1e12:.2f}" for k in v])
        print(" | ".join(rows[-1]), flush=True)
    header = ["conv (bf16, batch %d)" % B, "GFLOP per pass", "forward ms / TFLOP/s", "backward-data",
              "backward-weights (oneDNN, + bias)", "backward-weights (matmul, FastConv2d)"]
    table = C.markdown_table(header, rows)
    print(table)
    if args.record:
        section = "conv_layers" + ("" if args.layer_shapes == "vgg16" else f"_{args.layer_shapes}")
        C.record(section, f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}\n\n{table}\n")


def load_mnist(root: Path, split: str, limit: int):
    """MNIST from the IDX gz files: uint8 images (N, 1, 32, 32) zero-padded from 28x28, labels."""
    import gzip

    import numpy as np

    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    images = np.zeros((len(data), 1, 32, 32), np.uint8)
    images[:, 0, 2:30, 2:30] = data
    return torch.from_numpy(images[:limit]), torch.from_numpy(labels[:limit].astype(np.int64))


def accuracy(args) -> None:
    """fp32 against the engine's bf16 path on real data: same seed, same batches."""
    root = Path(args.mnist)
    xtr, ytr = load_mnist(root, "train", args.acc_train)
    xte, yte = load_mnist(root, "test", args.acc_test)
    rows = []
    for precision in ("fp32", "bf16"):
        engine = make_engine("cpu", precision, channels_last=True, compile=False)
        torch.manual_seed(0)
        model = engine.prepare(create_model(args.acc_net, num_classes=10, in_channels=1))
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
        step = TrainStep(model, opt, nn.CrossEntropyLoss(), engine)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for epoch in range(args.acc_epochs):
            model.train()
            perm = torch.randperm(len(xtr), generator=g)
            total, n = 0.0, 0
            for i in range(0, len(perm) - args.acc_batch + 1, args.acc_batch):
                idx = perm[i:i + args.acc_batch]
                x = engine.to_input((xtr[idx].float() / 255 - 0.1307) / 0.3081)
                loss, _ = step(x, ytr[idx])
                total, n = total + float(loss), n + 1
            print(f"{precision} epoch {epoch + 1}: train loss {total / n:.4f}", flush=True)
        train_s = time.perf_counter() - t0
        model.eval()
        correct = 0
        for i in range(0, len(xte), 500):
            x = engine.to_input((xte[i:i + 500].float() / 255 - 0.1307) / 0.3081)
            correct += int((predict_logits(model, x, engine).argmax(1) == yte[i:i + 500]).sum())
        acc = correct / len(xte)
        rows.append([precision, f"{total / n:.4f}", f"{acc:.2%}", f"{train_s:.0f}"])
        print(rows[-1], flush=True)
    # binomial standard error of a test accuracy near the measured one
    p = float(rows[0][2].rstrip("%")) / 100
    se = (p * (1 - p) / len(xte)) ** 0.5
    table = C.markdown_table(["precision", "last-epoch train loss", "test accuracy", "train s"], rows)
    print(table)
    if args.record:
        C.record("accuracy", f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}\n\n"
                 f"{args.acc_net} on MNIST (first {len(xtr)} training images, {args.acc_epochs} epochs, "
                 f"batch {args.acc_batch}, SGD-Nesterov lr 0.02; first {len(xte)} test images), the same "
                 f"seed and batch order for both; the bf16 row is vggkit's CPU bf16 path (autocast + "
                 f"channels_last + FastConv2d). Standard error of the test accuracy: ~{se:.2%}.\n\n"
                 f"{table}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="vgg16_bn and the compact net, 3 windows")
    ap.add_argument("--nets", nargs="*", choices=list(NETS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32, help="side of the random images")
    ap.add_argument("--freeze-features", action="store_true",
                    help="the fine-tuning step: features frozen, backward through the head alone")
    ap.add_argument("--freeze-compare", action="store_true",
                    help="vggkit's step with the features frozen against training everything")
    ap.add_argument("--fused-compare", action="store_true",
                    help="fused BatchNorm + ReLU vs the stock layers vs plain bf16, alternating")
    ap.add_argument("--memory", action="store_true",
                    help="peak RSS and speed of each kind of step, each in a fresh process")
    ap.add_argument("--memory-child", choices=["plain", "stock", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--windows", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", metavar="NET", choices=list(NETS))
    ap.add_argument("--layers", action="store_true",
                    help="per-layer TFLOP/s of a network's convolutions: forward, backward-data, -weights")
    ap.add_argument("--layer-shapes", choices=list(LAYER_SHAPES), default="vgg16",
                    help="with --layers: whose convolutions")
    ap.add_argument("--accuracy", action="store_true",
                    help="train fp32 and bf16 on an MNIST subset and compare test accuracy")
    ap.add_argument("--mnist", default="../shared/data/mnist")
    ap.add_argument("--acc-net", default="vgg11_bn")
    ap.add_argument("--acc-train", type=int, default=6000)
    ap.add_argument("--acc-test", type=int, default=2000)
    ap.add_argument("--acc-epochs", type=int, default=2)
    ap.add_argument("--acc-batch", type=int, default=128)
    ap.add_argument("--no-record", dest="record", action="store_false",
                    help="do not write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.layers:
        layers(args)
    elif args.accuracy:
        accuracy(args)
    elif args.profile:
        profile(args)
    elif args.freeze_compare:
        freeze_compare(args)
    elif args.fused_compare:
        fused_compare(args)
    elif args.memory_child:
        memory_child(args)
    elif args.memory:
        memory(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
