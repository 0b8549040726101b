"""Folders bigger than memory: training from the memory-mapped photo cache under a memory cap.

    python bench/stream_memory.py --photos 20000 --batch 16 --stored-size 400 --cap-mb 2600

Generates a folder of JPEG photos of many sizes (once, under --work), decodes it into vggkit's
photo cache (whose size must be >= 3x the cap), then alternates two child processes that each
train the same steps of vgg11_bn (gap head, random resized crops of --crop px, batch --batch,
bf16 where the CPU has it):

* memory: the whole cache read into memory (``--data-placement device``), no cap;
* stream: ``--data-placement stream`` inside a cgroup (v1 or v2) whose memory limit is --cap-mb:
  page cache and process memory together may not exceed it.

Each child reports images/s over its timed steps (after warm-up) and its peak memory: the
cgroup's peak (page cache included) for the capped one, and the process's peak RSS for both.
The batches are drawn over the whole dataset (random order), so the streamed run reads from
all of the cache file, far more than fits in the cap. The cap must hold the training step
itself (about 2.1 GB for vgg11_bn at 224 px, batch 16, on a bf16 CPU): hence the stored size
of 400 px, which makes the 20,000-photo cache 9.1 GB, 3.5x the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_line  # noqa: E402


def load_average() -> str:
    return "%.2f" % os.getloadavg()[0]


def make_folder(root: Path, photos: int, seed: int = 0) -> None:
    """``photos`` JPEGs of 10 classes, sides 180-400 px, smooth colour fields with noise."""
    from PIL import Image

    if (root / "done").exists():
        return
    rng = np.random.default_rng(seed)
    for i in range(photos):
        label = i % 10
        split = "test" if (i // 10) % 20 == 0 else "train"
        w, h = (int(v) for v in rng.integers(180, 401, 2))
        base = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 1, 3) * 60
        base[..., label % 3] += 120 + 10 * (label // 3)
        base += rng.normal(0, 25, (h, w, 3))
        d = root / split / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=85)
    (root / "done").write_text("ok")


def dataset_args(args) -> dict:
    return dict(data_dir=str(args.work / "data"), image_size=args.crop, photos=True, val_split=0,
                stored_size=args.stored_size)


def child(args) -> None:
    """One measured training loop in this process (inside the cgroup when capped)."""
    import torch

    from vggkit import create_model
    from vggkit.data import Loader, load_dataset
    from vggkit.data.photo import PhotoCrop
    from vggkit.training.engine import make_engine

    torch.set_num_threads(os.cpu_count() or 1)
    ds = load_dataset(f"folder:{args.work / 'photos'}", progress=False, **dataset_args(args))
    engine = make_engine("cpu", "auto", True, False)
    loader = Loader(ds.x_train, ds.y_train, args.batch, shuffle=True, seed=0, mean=ds.mean,
                    std=ds.std, photo=PhotoCrop(train=True, size=args.crop, flip=True),
                    device=engine.device, channels_last=True, placement=args.child)
    model = engine.prepare(create_model("vgg11_bn", num_classes=10, input_size=args.crop, head="gap"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = loader.epoch(0)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        with engine.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    batches.close()
    print(json.dumps({"placement": loader.placement, "describe": loader.describe(),
                      "images_per_second": args.batch * len(times) / sum(times),
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: of its own address space; ru_maxrss would
    also count the process it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_cgroup(cap_bytes: int) -> Path | None:
    """A child memory cgroup (v2 or v1) of ours limited to ``cap_bytes``, or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/cgroup.controllers").exists():
            cg, limit = Path(f"/sys/fs/cgroup{path}/vggkit-bench"), "memory.max"
        elif "memory" in controllers.split(","):
            cg, limit = Path(f"/sys/fs/cgroup/memory{path}/vggkit-bench"), "memory.limit_in_bytes"
        else:
            continue
        try:
            cg.mkdir(exist_ok=True)
            (cg / limit).write_text(str(cap_bytes))
            return cg
        except OSError:
            continue
    return None


def cgroup_peak(cg: Path) -> float | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if (cg / name).exists():
            return int((cg / name).read_text()) / 2**20
    return None


def run_child(args, placement: str, cg: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", placement, "--work", str(args.work), "--crop",
           str(args.crop), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--stored-size", str(args.stored_size)]
    if cg is not None:
        for name in ("memory.max_usage_in_bytes",):  # reset the v1 peak
            if (cg / name).exists():
                (cg / name).write_text("0")
        enter = f"echo $$ > {cg}/cgroup.procs && exec \"$@\""
        cmd = ["sh", "-c", enter, "sh", *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["cgroup_peak_mb"] = cgroup_peak(cg) if cg is not None else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=20000)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stored-size", type=int, default=400,
                   help="side the cache stores each photo's longer side at (its size on disk)")
    p.add_argument("--cap-mb", type=int, default=2600)
    p.add_argument("--work", type=Path, default=Path("/tmp/vggkit-stream-bench"))
    p.add_argument("--child", choices=("device", "stream"))
    args = p.parse_args()
    if args.child:
        return child(args)
    from vggkit.data import load_dataset

    load_start = load_average()
    t0 = time.perf_counter()
    make_folder(args.work / "photos", args.photos)
    made = time.perf_counter()
    ds = load_dataset(f"folder:{args.work / 'photos'}", **dataset_args(args))
    decoded = time.perf_counter()
    cache_mb = ds.x_train.array.nbytes / 2**20
    print(f"folder of {args.photos:,} photos: {made - t0:.0f} s to write, {decoded - made:.0f} s to "
          f"decode (or load); cache {cache_mb:,.0f} MiB = {cache_mb / args.cap_mb:.1f}x the cap")
    cg = make_cgroup(args.cap_mb << 20)
    rows = []
    for _ in range(args.rounds):  # alternated: the host's speed swings
        for mode, placement, group in (("memory", "device", None), ("stream", "stream", cg)):
            rows.append((mode, run_child(args, placement, group)))
            print(mode, json.dumps(rows[-1][1]), flush=True)
    print(f"machine: {machine_line()}\ncommand: {command_line()}\nload average: {load_start} -> {load_average()}")
    print("| mode | images/s | peak RSS (MiB) | cgroup peak incl. page cache (MiB) | cap (MiB) |")
    print("|---|---|---|---|---|")
    for mode, r in rows:
        peak = f"{r['cgroup_peak_mb']:,.0f}" if r["cgroup_peak_mb"] is not None else "-"
        cap = f"{args.cap_mb:,}" if mode == "stream" and cg is not None else "none"
        print(f"| {mode} ({r['describe']}) | {r['images_per_second']:.1f} | {r['peak_rss_mb']:,.0f} | {peak} | {cap} |")
    for mode in ("memory", "stream"):
        best = max(r["images_per_second"] for m, r in rows if m == mode)
        print(f"best {mode}: {best:.1f} images/s")


if __name__ == "__main__":
    main()
