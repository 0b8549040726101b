"""The CUDA paths on real hardware, in one short script (under 5 minutes on one GPU).

Run it first whenever a GPU machine is at hand, and record its table in docs/benchmarks.md:

    python bench/gpu_check.py                      # CUDA; generated CIFAR-size data
    python bench/gpu_check.py --data folder:DIR/cifar10-jpg.zip
    python bench/gpu_check.py --allow-cpu --steps 6  # a smoke test of the script itself on CPU

What it checks, each as a row that says ok or what failed (it never stops at the first):
device selection and the precision ``auto`` picks (bf16 autocast, or fp16 with the loss
scaler on GPUs without bf16); a brief fast-cifar10 and VGG-16-BN training through
``vggkit.train`` (the on-device loader, channels_last, the scaler), resume to one more epoch,
the regularisers (EMA, mixup, cutmix, TrivialAugment) and the everyday flags on the device,
torchrun on every GPU (the cpu:gloo,cuda:nccl group, --sync-bn, per-rank RNG states, resume),
evaluate, ONNX export; torch.compile on the compact net; and images/s of vggkit's step against
a plain fp32 eager loop and the airbench94 reference port (bench/airbench_reference.py) run the
same way on the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from vggkit import create_model  # noqa: E402
from vggkit.config import TrainConfig  # noqa: E402
from vggkit.training.engine import TrainStep, make_engine  # noqa: E402
from vggkit.workflow import train  # noqa: E402

ROWS: list[dict] = []


def check(name: str):
    """Run one check, record ok / the error; never raise."""
    def wrap(fn):
        start = time.perf_counter()
        try:
            detail = fn()
            ROWS.append({"check": name, "ok": True, "detail": detail,
                         "seconds": time.perf_counter() - start})
        except Exception as exc:  # noqa: BLE001 - a report, not a test runner
            traceback.print_exc()
            ROWS.append({"check": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}",
                         "seconds": time.perf_counter() - start})
        return fn
    return wrap


def images_per_second(step, batch: int, steps: int, device: torch.device) -> float:
    step()  # warm-up (cudnn autotune, compile)
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def plain_loop(model: nn.Module, x, y):
    """The loop a tutorial writes: fp32, NCHW, eager."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def vggkit_loop(model: nn.Module, x, y, device: str, compile_: bool = False):
    engine = make_engine(device, "auto", True, compile_, None)
    net = engine.maybe_compile(engine.prepare(model))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    step = TrainStep(net, opt, nn.CrossEntropyLoss(), engine)
    xx = engine.to_input(x)
    return lambda: step(xx, y), engine


def airbench_loop(x, y):
    """The airbench94 reference network and its summed-loss SGD step, bf16/fp16 autocast."""
    import airbench_reference as ref

    net = ref.make_net(3, 10).to(x.device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.85, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    dtype = torch.bfloat16 if x.device.type == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False) \
        else torch.float16
    xx = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(x.device.type, dtype=dtype):
            loss = loss_fn(net(xx).float(), y).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def torchrun_check(work: Path, data: str, data_dir: str | None, cuda: bool) -> str:
    """The process group (cpu:gloo,cuda:nccl: the epoch's sums are CPU tensors), --sync-bn
    with two or more GPUs, and per-rank RNG states in the checkpoint, resumed."""
    import os
    import subprocess

    from vggkit.training.checkpoint import load_checkpoint

    procs = torch.cuda.device_count() if cuda else 2
    run = work / "ddp"
    args = ["--model", "vgg11_bn", "--head", "linear", "--dataset", data, "--batch-size", "64",
            "--schedule", "constant", "--lr", "0.02", "--no-report",
            "--no-download", "--out", str(run), *(["--data-dir", data_dir] if data_dir else []),
            *(["--sync-bn"] if cuda and procs > 1 else [])]
    for extra in (["--epochs", "1"], ["--resume", str(run), "--epochs", "2"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
               "--standalone", "-m", "vggkit", "train",
               *(args if extra[0] == "--epochs" else []), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            said = [line for line in done.stderr.splitlines() if "rror" in line]
            raise RuntimeError(f"{' '.join(extra)}: exit {done.returncode}: "
                               f"{(said or done.stderr.splitlines() or [''])[0][:300]}")
    summary = json.loads((run / "summary.json").read_text())
    rngs = sorted(load_checkpoint(run / "checkpoints" / "last.safetensors").rng)
    digests = set(summary["rank_weights_digests"])
    assert len(digests) == 1, summary["rank_weights_digests"]
    return (f"{procs} processes, epochs {summary['epochs_completed']}, one digest, RNG states "
            f"{rngs}, test {100 * summary['test_acc']:.2f}%")


def training_checks(work: Path, data: str, data_dir: str | None, device: str, small: bool,
                    cuda: bool) -> None:
    """Each path through vggkit.train, evaluate and export on the device: one row each."""
    base = dict(dataset=data, data_dir=data_dir, download=False, device=device,
                precision="auto", report=False)

    @check("engine: device and precision auto")
    def _():
        engine = make_engine(device, "auto", True, False, None)
        scaler = engine.make_scaler()
        return (f"{engine.device}, {engine.precision} ({engine.precision_reason}); loss "
                f"scaler {'on' if scaler is not None else 'off'}")

    runs = {}

    @check("fast-cifar10, 2 epochs (vggkit.train)")
    def _():
        from vggkit.config import resolve_config

        config = resolve_config({**base, "epochs": 2, "out": str(work / "fast"),
                                 **({"batch_size": 128} if small else {})},
                                recipe="fast-cifar10")
        s = train(config, progress=False)
        runs["fast"] = s
        return f"test {100 * s['test_acc']:.2f}%, {s['images_per_second']:,.0f} img/s"

    @check("VGG-16-BN, 1 epoch, constant rate (vggkit.train)")
    def _():
        config = TrainConfig(**base, model="vgg16_bn", head="linear", epochs=1,
                             batch_size=64 if small else 256, schedule="constant", lr=0.02,
                             out=str(work / "v16"))
        s = train(config, progress=False)
        runs["v16"] = s
        return f"test {100 * s['test_acc']:.2f}%, {s['images_per_second']:,.0f} img/s"

    @check("resume VGG-16-BN to 2 epochs")
    def _():
        s = train(TrainConfig(resume=str(work / "v16"), epochs=2), progress=False)
        assert s["epochs_completed"] == 2, s["epochs_completed"]
        return f"epochs {s['epochs_completed']}, test {100 * s['test_acc']:.2f}%"

    @check("VGG-11-BN: --grad-accum 4, --class-weights auto, --balanced-sampling, --time-budget")
    def _():
        config = TrainConfig(**base, model="vgg11_bn", head="linear", grad_accum=4,
                             class_weights="auto", balanced_sampling=True,
                             time_budget="1m" if small else "2m",
                             batch_size=64 if small else 256, out=str(work / "v11"))
        s = train(config, progress=False)
        b = s["time_budget"]
        return (f"{b['epochs']} epochs planned at ~{b['images_per_second']:,.0f} img/s, took "
                f"{s['wall_seconds']:.0f} s of {b['budget_seconds']:.0f}; test "
                f"{100 * s['test_acc']:.2f}%")

    @check("VGG-11-BN: --ema, --mixup, --cutmix, --auto-augment trivial, 1 epoch")
    def _():
        config = TrainConfig(**base, model="vgg11_bn", head="linear", epochs=1, ema=0.999,
                             ema_warmup=True, mixup=0.8, cutmix=1.0, auto_augment="trivial",
                             batch_size=64 if small else 256, out=str(work / "reg"))
        s = train(config, progress=False)
        return f"test {100 * s['test_acc']:.2f}% (the average), {s['images_per_second']:,.0f} img/s"

    @check("torchrun: every GPU (2 CPU processes without one), 1 epoch, then resume to 2")
    def _():
        return torchrun_check(work, data, data_dir, cuda)

    @check("evaluate the run")
    def _():
        from vggkit.evaluation import evaluate

        r = evaluate(work / "v16", device=device)
        return f"top-1 {100 * r['top1']:.2f}% on {r['n']} images ({r['precision']})"

    @check("ONNX export, checked with onnxruntime")
    def _():
        from vggkit.evaluation.export import export_onnx

        r = export_onnx(work / "v16" / "checkpoints" / "last.safetensors", work / "v16.onnx")
        return json.dumps(r, default=str)[:160]


def speed_checks(device: str, small: bool, batch: int, steps: int) -> None:
    """Images/s of vggkit's step against a plain fp32 eager loop and the airbench94
    reference, on the same batches."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    speed = {}
    for net in ("vgg16_bn", "vgg_compact"):
        @check(f"{net}: images/s, plain fp32 eager loop")
        def _():
            model = create_model(net, num_classes=10).to(dev)
            speed[(net, "plain")] = images_per_second(plain_loop(model, x, y), batch,
                                                      steps, dev)
            return f"{speed[(net, 'plain')]:,.0f}"

        @check(f"{net}: images/s, vggkit's step")
        def _():
            step, engine = vggkit_loop(create_model(net, num_classes=10), x, y, device)
            speed[(net, "vggkit")] = images_per_second(step, batch, steps, dev)
            return (f"{speed[(net, 'vggkit')]:,.0f} ({engine.precision}), "
                    f"{speed[(net, 'vggkit')] / speed.get((net, 'plain'), float('nan')):.2f}x "
                    "the plain loop")

    @check("vgg_compact: images/s, vggkit's step with torch.compile")
    def _():
        step, _ = vggkit_loop(create_model("vgg_compact", num_classes=10), x, y, device, True)
        return f"{images_per_second(step, batch, steps, dev):,.0f}"

    @check("airbench94 reference net: images/s, same batches")
    def _():
        ips = images_per_second(airbench_loop(x, y), batch, steps, dev)
        return f"{ips:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="a dataset (default: generated CIFAR-format)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no GPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here (pass --allow-cpu to smoke-test the script)")
        return 2
    device = "cuda" if cuda else "cpu"
    small = not cuda  # CPU smoke test: tiny sizes
    print(machine_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="vggkit-gpu-check-"))
    data, data_dir = args.data, None
    if data is None:
        from vggkit.data.testing import write_cifar

        # noise at CIFAR's size: 10,000 training images on a GPU, 1,000 for the CPU smoke test
        write_cifar(work / "data", "cifar10", n_per_batch=200 if small else 2000,
                    n_test=200 if small else 1000)
        data, data_dir = "cifar10", str(work / "data")
    training_checks(work, data, data_dir, device, small, cuda)
    speed_checks(device, small, 32 if small else args.batch, args.steps)
    print("\n| check | ok | detail | seconds |\n| --- | --- | --- | --- |")
    for r in ROWS:
        print(f"| {r['check']} | {'ok' if r['ok'] else 'FAILED'} | {r['detail']} | "
              f"{r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "rows": ROWS},
                                              indent=2, default=str))
    return 0 if all(r["ok"] for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
