"""The training loop: config -> dataset -> loader -> model -> steps -> run folder.

One function, readable top to bottom, serves single-process and torchrun runs and every
recipe. Resume is exact: the data order and augmentation are functions of (seed, epoch),
the learning rate a function of the iteration, and the RNG and optimizer states are saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vggkit import __version__
from vggkit.config import FIELDS, TrainConfig, apply_overrides
from vggkit.errors import CheckpointError, UsageError, VggkitError
from vggkit.models import (
    count_parameters,
    create_model,
    get_architecture,
    load_matching,
    read_state_dict,
)
from vggkit.models.vgg import init_whitening
from vggkit.models.weights import remap_stagewise
from vggkit.training import distributed as D
from vggkit.training.checkpoint import (
    check_loadable,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vggkit.training.engine import Engine, TrainStep, cpu_name, make_engine, predict_logits
from vggkit.training.optim import Lookahead, Schedule, build_optimizer, set_lr

log = logging.getLogger("vggkit.train")


class TrainingInterrupted(VggkitError):
    """SIGINT/SIGTERM: a checkpoint was written; the message holds the resume command."""

    exit_code = 130


class NonFiniteLoss(VggkitError):
    pass


# ----------------------------------------------------------------------------- run folder
def default_run_name(config: TrainConfig) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.dataset.split(":", 1)[-1]).stem
                     if ":" in config.dataset else config.dataset).strip("-")
    prefix = config.dataset.split(":", 1)[0] + "-" if ":" in config.dataset else ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{prefix}{dataset}-{config.model}-{stamp}"


def prepare_run_folder(config: TrainConfig, resuming: bool) -> Path:
    """Create the run folder; never write into a non-empty one unless resuming or told to."""
    out = Path(config.out or default_run_name(config))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resuming or config.overwrite):
        raise UsageError(
            f"--out {out}: folder exists and is not empty; pass --resume {out} to continue it "
            "or --overwrite to train into it anyway"
        )
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One whole line per write, flushed and fsynced: a killed process leaves no torn line
    that a reader has to guess about (readers also skip a partial last line)."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, ignoring a torn last line left by a crash."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- helpers
def environment_info(engine: Engine) -> dict[str, Any]:
    info = {
        "vggkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def resolve_image_size(config: TrainConfig, native: int) -> int:
    """The dataset's side raised to at least 32 (the CIFAR size VGG recipes use) and to a
    multiple the model's poolings divide: digits 8 -> 32, MNIST 28 -> 32, 224 stays."""
    if config.image_size:
        return config.image_size
    factor = 2 ** get_architecture(config.model).num_pools
    side = max(native, 32)
    if (config.head or get_architecture(config.model).default_head) == "imagenet":
        return side
    return math.ceil(side / factor) * factor


def build_init_state(config: TrainConfig, model: nn.Module) -> None:
    """--init-from: another run's or checkpoint's matching layers, or a torchvision-layout
    weights file."""
    source = Path(config.init_from)
    if source.is_dir() or (source.suffix == ".safetensors" and check_loadable(source)):
        ckpt = load_checkpoint(find_checkpoint(source, "best"))
        state = ckpt.model_state
        src_arch = get_architecture(ckpt.meta["model"]["name"])
        dst_arch = get_architecture(config.model)
        if src_arch.config != dst_arch.config:
            state = remap_stagewise(state, src_arch, dst_arch)
        report = load_matching(model, state, partial=True, only_features=False,
                               source=f"--init-from {source}")
    else:
        state = read_state_dict(source)
        report = load_matching(model, state, partial=config.partial,
                               source=f"--init-from {source}")
    log.info("--init-from %s: %s", source, report)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes: equal digests, equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class EpochTotals:
    """Device-side sums, read once per display update or epoch (no per-step sync)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int = 0
    seconds: float = 0.0

    @staticmethod
    def zeros(device: torch.device) -> EpochTotals:
        return EpochTotals(torch.zeros((), device=device, dtype=torch.float64),
                           torch.zeros((), device=device, dtype=torch.int64))


def tta_logits(model: nn.Module, images: torch.Tensor, engine: Engine,
               translate: int = 0) -> torch.Tensor:
    """Test-time augmentation, airbench's: the mean of the view and its mirror image; with
    ``translate`` t, that mean weighted 1/2 plus, 1/4 each, the same for the views shifted
    by t pixels up-left and down-right (reflect padding)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=engine.memory_format)

    def mirror(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (predict_logits(model, view(x), engine)
                      + predict_logits(model, view(x.flip(-1)), engine))

    logits = mirror(images)
    if translate:
        t = translate
        h, w = images.shape[-2:]
        padded = nn.functional.pad(images, (t, t, t, t), mode="reflect")
        shifted = mirror(padded[:, :, :h, :w]) + mirror(padded[:, :, 2 * t:2 * t + h,
                                                                2 * t:2 * t + w])
        logits = 0.5 * logits + 0.25 * shifted
    return logits


@torch.no_grad()
def collect_logits(model: nn.Module, loader, engine: Engine, tta: bool = False,
                   translate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels of a whole split, in loader order, on the CPU."""
    model.eval()
    outs, labels = [], []
    for images, target in loader.epoch(0):
        if tta:
            logits = tta_logits(model, images, engine, translate)
        else:
            logits = predict_logits(model, images, engine)
        outs.append(logits.cpu())
        labels.append(target.cpu())
    return torch.cat(outs), torch.cat(labels)


def whiten_from_data(model: nn.Module, images: torch.Tensor, mean, std,
                     count: int = 5000) -> None:
    """Set the model's whitening stem from the first ``count`` training images, normalised
    as the loader normalises them (airbench uses 5,000)."""
    x = images[:count].to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    init_whitening(model.features[0], (x - m) / s)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    loss = nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    out = {"loss": loss, "acc": acc}
    if logits.shape[1] > 5:
        top5 = logits.topk(5, 1).indices
        out["top5_acc"] = (top5 == labels[:, None]).any(1).float().mean().item()
    return out


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step and writing a "
              "checkpoint (press again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Progress:
    """A tqdm bar per epoch on a terminal; nothing mid-epoch otherwise (plain lines only)."""

    def __init__(self, total: int, epoch: int, epochs: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch",
                            leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- train
def resolve_resume(config: TrainConfig, explicit: set[str] | None = None
                   ) -> tuple[TrainConfig, Any]:
    """With --resume RUN: the run's saved config, overridden by the options the user gave
    (``explicit``, from the CLI; from the API, those that differ from the defaults), e.g.
    more --epochs; and its last checkpoint."""
    import yaml

    run = Path(config.resume)
    if not (run / "config.yaml").is_file():
        raise UsageError(f"--resume {run}: not a run folder (no config.yaml)")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    defaults = TrainConfig()
    given = explicit if explicit is not None else {
        name for name in FIELDS if getattr(config, name) != getattr(defaults, name)}
    changed = {name: getattr(config, name) for name in given if name not in ("resume", "out")}
    merged = apply_overrides(TrainConfig(), {**saved, **changed}, source=f"{run}/config.yaml")
    merged = dataclasses.replace(merged, resume=str(run), out=str(run))
    ckpt_path = run / "checkpoints" / "last.safetensors"
    if not ckpt_path.is_file():
        # Stopped before its first checkpoint: nothing to continue, so start it again.
        log.warning("--resume %s: no checkpoint yet; training it from the start", run)
        return merged, None
    return merged, load_checkpoint(ckpt_path)


def train(config: TrainConfig, *, progress: bool = True,
          explicit: set[str] | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (the fields of summary.json).
    ``explicit``: the options the user set (the CLI passes them), which override a resumed
    run's saved config even where they equal the defaults."""
    wall_start = time.perf_counter()
    checkpoint = None
    if config.resume:
        config, checkpoint = resolve_resume(config, explicit)

    # --- engine and processes
    engine = make_engine(config.device, config.precision, config.channels_last,
                         config.compile, config.threads)
    dist = D.init_distributed(engine.device)
    engine.device = D.local_device(engine.device, dist)
    lr = config.lr * (dist.world_size if config.scale_lr == "linear" else 1)
    main = dist.is_main
    if not main:
        logging.getLogger("vggkit").setLevel(logging.WARNING)

    # --- run folder (rank 0 writes; the others only read)
    out = prepare_run_folder(config, resuming=bool(config.resume)) if main else None
    out = Path(D.broadcast_object(str(out) if out else None, dist))
    log.info("device %s, precision %s (%s)%s", engine.device, engine.precision,
             engine.precision_reason, f", {dist.world_size} processes" if dist.enabled else "")

    # --- data
    from vggkit.data import Augment, Loader, load_dataset

    arch = get_architecture(config.model)
    head = config.head or arch.default_head
    probe = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download and main,
                         download_url=config.download_url, channels=config.channels,
                         subset=config.subset, val_split=config.val_split, seed=config.seed,
                         skip_bad_images=config.skip_bad_images, progress=progress and main,
                         image_size=config.image_size or None) if main else None
    D.barrier(dist)
    native = probe.x_train.shape[-1] if probe is not None else None
    image_size = resolve_image_size(config, D.broadcast_object(native, dist))
    if probe is not None and probe.x_train.shape[-1] == image_size:
        dataset = probe
    else:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, download=False,
                               download_url=config.download_url, image_size=image_size,
                               channels=config.channels, subset=config.subset,
                               val_split=config.val_split, seed=config.seed,
                               skip_bad_images=config.skip_bad_images, progress=False)
    channels = dataset.x_train.shape[1]
    num_classes = len(dataset.classes)
    if config.normalize == "meanstd":
        mean, std = list(dataset.mean), list(dataset.std)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    augment = Augment(crop_padding=config.crop_padding, pad_mode=config.pad_mode,
                      flip=config.flip, cutout=config.cutout)
    loader_args = dict(mean=mean, std=std, device=engine.device,
                       channels_last=engine.channels_last)
    train_loader = Loader(dataset.x_train, dataset.y_train, config.batch_size, shuffle=True,
                          seed=config.seed, augment=augment, rank=dist.rank,
                          world_size=dist.world_size, drop_last=config.drop_last, **loader_args)
    has_val = dataset.x_val is not None and len(dataset.x_val) > 0
    val_x, val_y = (dataset.x_val, dataset.y_val) if has_val else (dataset.x_test, dataset.y_test)
    val_loader = Loader(val_x, val_y, config.eval_batch_size, shuffle=False, rank=dist.rank,
                        world_size=dist.world_size, **loader_args)
    if len(train_loader) == 0:
        raise UsageError(f"--batch-size {config.batch_size}: no full batch in "
                         f"{len(dataset.x_train)} training images")

    # --- model and optimizer
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=num_classes, in_channels=channels,
                         input_size=image_size, head=head, dropout=config.dropout)
    if arch.whiten_kernel and checkpoint is None:
        whiten_from_data(model, dataset.x_train, mean, std)
    if arch.whiten_kernel and config.whiten_bias_epochs is not None and dist.enabled:
        raise UsageError("--whiten-bias-epochs freezes a parameter mid-run, which "
                         "DistributedDataParallel does not allow; leave it unset under torchrun")
    if config.init_from and checkpoint is None:
        build_init_state(config, model)
    params = count_parameters(model)
    model = engine.prepare(model)
    if dist.enabled and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, config, lr)
    schedule = Schedule.from_config(config, lr, len(train_loader))
    lookahead = Lookahead.from_config(model, config, len(train_loader) * config.epochs)
    start_epoch, start_batch, best = 0, 0, {"acc": -1.0, "epoch": 0}
    stale_epochs = 0
    partial_totals = None
    if checkpoint is not None:
        meta = checkpoint.meta
        try:
            model.load_state_dict(checkpoint.model_state)
            optimizer_state = checkpoint.optimizer_state
            if lookahead is not None:
                optimizer_state = lookahead.unpack(optimizer_state)
            else:  # a lookahead average saved by a run that had it on: not ours to load
                optimizer_state = {**optimizer_state, "state": {
                    k: v for k, v in optimizer_state["state"].items() if int(k) >= 0}}
            optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"--resume {config.resume}: its checkpoint does not fit {config.model} with "
                f"{num_classes} classes at {channels}x{image_size}x{image_size} ({first}); "
                "resume with the run's own --model/--head/--dataset/--image-size") from None
        schedule.state = meta["schedule_state"]
        start_epoch, start_batch = meta["epoch"], meta.get("batch", 0)
        best, stale_epochs = meta["best"], meta.get("stale_epochs", 0)
        partial_totals = meta.get("partial_totals")
        if meta.get("world_size", 1) == dist.world_size:
            set_rng_state(checkpoint.rng, engine.device)
        log.info("resuming %s at epoch %d%s", out, start_epoch + 1,
                 f", batch {start_batch}" if start_batch else "")
    if checkpoint is None:  # dropout streams differ per process; a resume restores its own
        torch.manual_seed(config.seed * 1000 + dist.rank + 1)
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[engine.device.index] if engine.device.type == "cuda" else None)
    net = engine.maybe_compile(net)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    step = TrainStep(net, optimizer, loss_fn, engine)

    # --- what every checkpoint carries
    meta_base = {
        "config": config.to_dict(),
        "classes": list(dataset.classes),
        "mean": mean,
        "std": std,
        "image_shape": [channels, image_size, image_size],
        "model": {"name": config.model, "head": head, "num_classes": num_classes,
                  "in_channels": channels, "input_size": image_size, "dropout": config.dropout},
        "dataset": {"name": config.dataset, "source": getattr(dataset, "source", ""),
                    "train": len(dataset.x_train), "test": len(dataset.x_test),
                    "val": len(dataset.x_val) if has_val else 0},
        "world_size": dist.world_size,
    }

    def write_checkpoint(name: str, epoch: int, batch: int = 0, totals=None,
                         with_state: bool = True) -> None:
        if not main:
            return
        meta = {**meta_base, "epoch": epoch, "batch": batch, "best": best,
                "stale_epochs": stale_epochs, "schedule_state": schedule.state,
                "partial_totals": totals}
        optimizer_state = None
        if with_state:
            optimizer_state = optimizer.state_dict()
            if lookahead is not None:
                optimizer_state = lookahead.pack(optimizer_state)
        save_checkpoint(out / "checkpoints" / f"{name}.safetensors", model.state_dict(), meta,
                        optimizer_state,
                        rng_state(engine.device) if with_state else None)

    if main:
        (out / "config.yaml").write_text(config.to_yaml())
    writer = _tensorboard(out) if (config.tensorboard and main) else None

    # --- the loop
    metrics_path = out / "metrics.jsonl"
    if checkpoint is not None and main:
        # A crash between the metrics line and the checkpoint of an epoch (or mid-line)
        # leaves lines the checkpoint does not cover: drop them, the epoch runs again.
        kept = [r for r in read_metrics(metrics_path) if r.get("epoch", 0) <= start_epoch]
        tmp = metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, metrics_path)
    train_seconds = sum(r.get("epoch_seconds", 0.0) for r in read_metrics(metrics_path)
                        if r.get("epoch", 0) <= start_epoch) if checkpoint else 0.0
    images_seen = 0
    stopped_early = False
    steps_per_epoch = len(train_loader)
    with StopFlag() as stop:
        for epoch in range(start_epoch, config.epochs):
            net.train()
            if arch.whiten_kernel and config.whiten_bias_epochs is not None:
                model.features[0].bias.requires_grad_(epoch < config.whiten_bias_epochs)
            totals = EpochTotals.zeros(engine.device)
            first_batch = start_batch if epoch == start_epoch else 0
            if first_batch and partial_totals:
                totals.loss_sum += partial_totals["loss_sum"]
                totals.correct += partial_totals["correct"]
                totals.count, totals.seconds = partial_totals["count"], partial_totals["seconds"]
            bar = Progress(steps_per_epoch - first_batch, epoch + 1, config.epochs,
                           progress and main)
            tick = time.perf_counter()
            last_shown, shown = tick, 0
            # Resuming mid-epoch starts at the next batch; the loader draws the same
            # permutation and augmentation as a full pass, so the batches are identical.
            batches = train_loader.epoch(epoch, start=first_batch)
            for batch, (images, labels) in enumerate(batches, start=first_batch):
                it = epoch * steps_per_epoch + batch
                set_lr(optimizer, schedule.lr_at(it))
                loss, correct = step(images, labels)
                if lookahead is not None:
                    lookahead.after_step(it + 1, epoch)
                totals.loss_sum += loss.double() * len(labels)
                totals.correct += correct
                totals.count += len(labels)
                now = time.perf_counter()
                if now - last_shown > 0.5 or batch == steps_per_epoch - 1:
                    running = totals.loss_sum.item() / max(1, totals.count)
                    if not math.isfinite(running):
                        raise NonFiniteLoss(
                            f"loss became {running} at epoch {epoch + 1}, batch {batch + 1}: "
                            f"lower --lr (now {lr:g}) or use --precision fp32; the last good "
                            f"checkpoint is {out / 'checkpoints' / 'last.safetensors'}")
                    done_here = batch + 1 - first_batch
                    rate = done_here * config.batch_size / max(1e-9, now - tick)
                    bar.update(done_here - shown, loss=f"{running:.4f}",
                               acc=f"{100 * totals.correct.item() / max(1, totals.count):.2f}%",
                               img_s=f"{rate:,.0f}")
                    last_shown, shown = now, done_here
                if stop.signal is not None:
                    totals.seconds += time.perf_counter() - tick
                    bar.close()
                    write_checkpoint("last", epoch, batch + 1, {
                        "loss_sum": totals.loss_sum.item(), "correct": int(totals.correct.item()),
                        "count": totals.count, "seconds": totals.seconds})
                    D.shutdown(dist)
                    raise TrainingInterrupted(
                        f"interrupted by {signal.Signals(stop.signal).name} at epoch {epoch + 1}, "
                        f"batch {batch + 1}; checkpoint written. Resume with: "
                        f"vggkit train --resume {out}")
            if lookahead is not None:
                lookahead.end_epoch()
            bar.close()
            epoch_seconds = totals.seconds + time.perf_counter() - tick
            sums = torch.tensor([totals.loss_sum.item(), float(totals.correct.item()),
                                 float(totals.count)], dtype=torch.float64)
            D.all_reduce_sum(sums, dist)
            train_loss, train_acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(
                    f"loss became {train_loss} in epoch {epoch + 1}: lower --lr (now {lr:g}) or use "
                    f"--precision fp32; the last good checkpoint is "
                    f"{out / 'checkpoints' / 'last.safetensors'}")
            train_seconds += epoch_seconds
            images_seen += int(sums[2].item())

            # validation (the test split when no --val-split), sharded across processes
            val_logits, val_labels = collect_logits(net, val_loader, engine)
            vs = torch.tensor([nn.functional.cross_entropy(val_logits, val_labels,
                                                            reduction="sum").item(),
                               float((val_logits.argmax(1) == val_labels).sum().item()),
                               float(len(val_labels))], dtype=torch.float64)
            D.all_reduce_sum(vs, dist)
            val_loss, val_acc = (vs[0] / vs[2]).item(), (vs[1] / vs[2]).item()
            improved = val_acc > best["acc"]
            if improved:
                best = {"acc": val_acc, "epoch": epoch + 1}
                stale_epochs = 0
            else:
                stale_epochs += 1
            if schedule.end_epoch(val_acc):
                log.info("validation accuracy has not improved for %d epochs: learning rate x%g",
                         config.plateau_patience, config.gamma)
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds,
                "images_per_second": sums[2].item() / max(1e-9, epoch_seconds),
                "train_samples": int(sums[2].item()),
                "elapsed_seconds": train_seconds,
            }
            if main:
                append_jsonl(metrics_path, record)
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch":
                            writer.add_scalar(key, value, epoch + 1)
                write_checkpoint("last", epoch + 1)
                if improved:
                    write_checkpoint("best", epoch + 1, with_state=False)
            log.info("epoch %d/%d  loss %.4f  acc %.2f%%  %s_loss %.4f  %s_acc %.2f%%  "
                     "lr %.4g  %.1fs  %s img/s", epoch + 1, config.epochs, train_loss,
                     100 * train_acc, "val" if has_val else "test", val_loss,
                     "val" if has_val else "test", 100 * val_acc, record["lr"], epoch_seconds,
                     f"{record['images_per_second']:,.0f}")
            if config.early_stop and stale_epochs >= config.early_stop:
                log.info("early stop: no better validation accuracy for %d epochs", stale_epochs)
                stopped_early = True
                break

    # --- final test evaluation of the last weights, every rank on the whole test set
    test_loader = Loader(dataset.x_test, dataset.y_test, config.eval_batch_size, shuffle=False,
                         **loader_args)
    tick = time.perf_counter()
    logits, labels = collect_logits(model, test_loader, engine, tta=config.tta,
                                    translate=config.tta_translate)
    test_seconds = time.perf_counter() - tick
    test = score(logits, labels)
    history = read_metrics(metrics_path)
    digests = D.all_gather_object(weights_digest(model), dist)
    if len(set(digests)) > 1:
        log.warning("processes ended with different weights: %s", digests)
    summary = {
        "run": str(out),
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        **({"top5_acc": test["top5_acc"]} if "top5_acc" in test else {}),
        "tta": config.tta,
        "tta_translate": config.tta_translate if config.tta else 0,
        "test_seconds": test_seconds,
        "best_epoch": best["epoch"],
        "best_val_acc": best["acc"],
        "val_source": "val" if has_val else "test",
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "stopped_early": stopped_early,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "images_per_second": (sum(r["epoch_seconds"] * r["images_per_second"] for r in history)
                              / max(1e-9, sum(r["epoch_seconds"] for r in history))),
        "params": params,
        "model": meta_base["model"],
        "dataset": meta_base["dataset"],
        "engine": {**engine.describe(), "world_size": dist.world_size},
        "weights_digest": digests[0],
        "rank_weights_digests": digests,
        "precision": engine.precision,
        "software": {k: v for k, v in environment_info(engine).items()
                     if k in ("vggkit", "torch", "python", "numpy")},
        "machine": {k: v for k, v in environment_info(engine).items()
                    if k in ("platform", "cpu", "cpu_count", "hostname", "gpu")},
    }
    if main:
        np.savez_compressed(out / "predictions.npz", logits=logits.numpy(),
                            labels=labels.numpy())
        write_json_atomic(out / "summary.json", summary)
        if writer is not None:
            writer.close()
        log.info("test loss %.4f  test acc %.2f%%%s%s  time of learning %.1fs  wall time %.1fs"
                 "  -> %s", test["loss"], 100 * test["acc"],
                 f"  top-5 {100 * test['top5_acc']:.2f}%" if "top5_acc" in test else "",
                 " (TTA)" if config.tta else "", train_seconds, summary["wall_seconds"], out)
        if config.report:
            _write_report(out)
    D.shutdown(dist)
    return summary


def _write_report(out: Path) -> None:
    try:
        from vggkit.evaluation.report import write_report
    except ImportError:  # the evaluation package is optional at this layer
        return
    try:
        paths = write_report([out], out)
        log.info("report: %s", paths[0] if isinstance(paths, (list, tuple)) else paths)
    except VggkitError as exc:
        log.warning("report not written: %s", exc)
    except Exception as exc:  # noqa: BLE001 - the run is saved; a report bug must not fail it
        log.warning("report not written (a bug; `vggkit report %s --debug` shows it): %r", out, exc)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: "
                         "pip install 'vggkit[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
