"""The typed training config: one dataclass whose fields are the flags of ``vggkit train``
and the keys of a ``--config`` YAML file, one-to-one (``batch_size`` <-> ``--batch-size``).

Precedence: field defaults < recipe (``--recipe``) < ``--config`` file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vggkit.errors import UsageError, did_you_mean, unknown_name

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "plateau", "cosine", "onecycle", "time-decay", "triangle")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
NORMALIZE = ("meanstd", "unit", "imagenet")
PAD_MODES = ("reflect", "zeros")
SCALE_LR = ("none", "linear")
PLACEMENTS = ("auto", "device", "stream")
IMAGENET_INIT = "imagenet"  # --init-from imagenet: torchvision's ImageNet weights for --model


def opt(default: Any, help: str, *, choices: tuple | None = None, group: str = "training",
        cli: bool = True, metavar: str | None = None, const: Any = None) -> Any:
    """A config field with its command-line help; ``field(default_factory)`` for lists.
    ``const``: the flag's value may be left out (``--mlflow`` alone means ``--mlflow mlruns``)."""
    meta = {"help": help, "choices": choices, "group": group, "cli": cli, "metavar": metavar,
            "const": const}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model
    model: str = opt("vgg_compact", "registered network name (see `vggkit models`)", group="model")
    head: str | None = opt(None, "classifier head: classic|bn|gap|linear|imagenet|compact "
                           "(default: the model's own)", group="model")
    dropout: float = opt(0.5, "dropout rate of the dense head layers", group="model")
    init_from: str | None = opt(None, "start from another run's (or a weights file's) matching "
                                "layers, e.g. a trained VGG-11 for a VGG-16; 'imagenet': "
                                "torchvision's ImageNet weights for --model, found in torch's "
                                "cache or downloaded once (then --normalize imagenet and "
                                "--channels 3 unless given)", group="model",
                                metavar="RUN|WEIGHTS|imagenet")
    partial: bool = opt(False, "with --init-from: load what matches and report the rest "
                        "instead of failing on a mismatch", group="model")
    # --- data
    dataset: str = opt("digits", "cifar10|cifar100|cifar100-coarse|mnist|fashion-mnist|digits|"
                       "folder:PATH|npz:PATH", group="data")
    data_dir: str | None = opt(None, "where datasets live (default $VGGKIT_DATA, else a per-user "
                               "cache folder)", group="data")
    download: bool = opt(True, "download a missing official dataset (and --init-from "
                         "imagenet's weights)", group="data")
    download_url: str | None = opt(None, "base address to download datasets (and --init-from "
                                   "imagenet's weights) from (default the official ones; "
                                   "$VGGKIT_DOWNLOAD_URL, $VGGKIT_WEIGHTS_URL)", group="data")
    image_size: int | None = opt(None, "resize images to this side (default: the dataset's, "
                                 "raised to the smallest the model takes)", group="data")
    channels: int | None = opt(None, "1 or 3 input channels (default: the dataset's)", group="data")
    normalize: str = opt("meanstd", "per-channel mean/std of the training set, pixels/255, or "
                         "ImageNet's mean/std (the default with --init-from imagenet)",
                         choices=NORMALIZE, group="data")
    subset: int | None = opt(None, "train on N images, balanced across classes (seeded)",
                             group="data")
    val_split: float | None = opt(None, "validation images held out of the training set "
                                  "(stratified, seeded): a fraction (0.1) or a number (5000); "
                                  "0 trains on all of them and selects nothing (default: 5,000 "
                                  "for CIFAR, MNIST and Fashion-MNIST, 10%% for the others)",
                                  group="data", metavar="F_OR_N")
    skip_bad_images: bool = opt(False, "skip (and count) unreadable images in a folder dataset",
                                group="data")
    # --- augmentation (whole-batch, on the training device)
    crop_padding: int = opt(2, "random crop after padding by this many pixels (0: off)",
                            group="augmentation")
    pad_mode: str = opt("reflect", "padding for the random crop", choices=PAD_MODES,
                        group="augmentation")
    flip: bool = opt(False, "random horizontal flips", group="augmentation")
    cutout: int = opt(0, "cutout square side in pixels (0: off)", group="augmentation")
    auto_augment: str | None = opt(None, "per image on the device: 'trivial' "
                                   "(TrivialAugmentWide) or 'rand[-mM][-nN]' (RandAugment: N "
                                   "operations at magnitude M of 0..30, default rand-m9-n2)",
                                   group="augmentation", metavar="POLICY")
    mixup: float = opt(0.0, "mixup: blend each batch with itself reversed, ratio ~ "
                       "Beta(ALPHA, ALPHA), labels in the same shares (0: off; timm uses 0.8)",
                       group="augmentation", metavar="ALPHA")
    cutmix: float = opt(0.0, "cutmix: paste a box of the reversed batch, its area ~ "
                        "Beta(ALPHA, ALPHA), labels by pixel share (0: off; timm uses 1.0)",
                        group="augmentation", metavar="ALPHA")
    mix_prob: float = opt(1.0, "mixup/cutmix: the share of steps that are mixed",
                          group="augmentation")
    mix_switch_prob: float = opt(0.5, "with both --mixup and --cutmix: the share of mixed "
                                 "steps that use cutmix", group="augmentation")
    # --- photos (folders of images of many sizes: kept at their aspect ratio, cropped per batch)
    random_resized_crop: bool = opt(False, "photos: train on random resized crops (scale and "
                                    "aspect jitter, torchvision's RandomResizedCrop) of "
                                    "--image-size; evaluation takes resize + center crop",
                                    group="photos")
    crop_scale: list[float] = opt([0.08, 1.0], "random resized crop: range of the crop's share "
                                  "of the photo's area", group="photos", metavar="MIN,MAX")
    crop_ratio: list[float] = opt([0.75, 4 / 3], "random resized crop: range of the crop's "
                                  "aspect ratio (width/height)", group="photos", metavar="MIN,MAX")
    crop_pct: float = opt(0.875, "photos: evaluation, test and predict resize the shorter side "
                          "to --image-size / this, then take the center crop (timm's crop_pct)",
                          group="photos")
    stored_size: int | None = opt(None, "photos: longer side of each photo in the decoded cache "
                                  "(default 1.25 x --image-size); the aspect ratio is kept",
                                  group="photos")
    data_placement: str = opt("auto", "auto: the whole dataset on the training device when it "
                              "fits with room to spare (a quarter of the free memory), else "
                              "streamed: batches gathered from host memory or the "
                              "memory-mapped cache ahead of the step", choices=PLACEMENTS,
                              group="data")
    drop_last: bool = opt(False, "drop each epoch's last incomplete training batch")
    balanced_sampling: bool = opt(False, "each epoch draws every class equally often (seeded; "
                                  "a small class's images recur, a large class is subsampled), "
                                  "so an epoch keeps its number of images", group="data")
    # --- optimisation
    epochs: int = opt(12, "training epochs")
    batch_size: int = opt(64, "images per step (per process under torchrun)")
    optimizer: str = opt("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(0.05, "peak learning rate, or 'auto': run `vggkit lr-find` first and use "
                    "its suggestion (recorded in config.yaml)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum for SGD")
    betas: list[float] = opt([0.9, 0.999], "Adam/AdamW betas", metavar="B1,B2")
    weight_decay: float = opt(5e-4, "L2 weight decay (decoupled for AdamW)")
    schedule: str = opt("onecycle", "learning-rate schedule; onecycle is the linear one-cycle "
                        "(a triangle: 0.1x -> 1x over --warmup-epochs, default 30%% of training, "
                        "then linearly to 0), not PyTorch's cosine OneCycleLR, and it does not "
                        "cycle the momentum", choices=SCHEDULES)
    warmup_epochs: float = opt(0.0, "linear warm-up from 0 over this many epochs "
                               "(onecycle: its rising part)")
    step_size: int = opt(30, "step schedule: epochs between decays")
    gamma: float = opt(0.1, "step/plateau schedules: the factor the rate is multiplied by")
    plateau_patience: int = opt(3, "plateau schedule: epochs without a better validation "
                                "accuracy before the rate is cut")
    decay: float = opt(1e-6, "time-decay schedule: lr / (1 + decay * iterations), Keras's "
                       "legacy `decay`")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy")
    class_weights: str | None = opt(None, "loss weight per class: 'auto' gives n / (classes x "
                                    "n_class), scikit-learn's balanced weights (Keras's "
                                    "class_weight); or a YAML/JSON file of class: weight",
                                    metavar="auto|FILE")
    grad_accum: int = opt(1, "split each batch of --batch-size into this many chunks and add "
                          "their gradients before one step: the same step as the whole batch "
                          "(to float rounding; BatchNorm sees the chunks) in a fraction of the "
                          "memory", metavar="N")
    time_budget: str | None = opt(None, "train to a time limit, like 90m, 1.5h or 600s: a few "
                                  "steps are timed and --epochs is set so that the run, its "
                                  "final test and report end within it; the schedule is sized "
                                  "to that many epochs", metavar="TIME")
    triangle: list[float] = opt([0.2, 0.23, 0.07], "triangle schedule: start factor, peak "
                                "position (fraction of training), end factor (airbench's)",
                                metavar="START,PEAK,END")
    norm_lr_scale: float = opt(1.0, "learning-rate multiplier for BatchNorm parameters "
                               "(airbench: 64); with --decay-all their weight decay is divided "
                               "by it, so their per-step decay stays lr x wd")
    decay_all: bool = opt(False, "weight decay also on biases and BatchNorm parameters "
                          "(default: weights of convolutions and dense layers only)")
    lookahead: bool = opt(False, "airbench's lookahead averaging: from --lookahead-start, every "
                          "--lookahead-every steps, an average of the weights (and BatchNorm "
                          "statistics) is updated and copied back into the network")
    lookahead_start: int = opt(3, "epoch (0-based) at which lookahead averaging starts")
    lookahead_every: int = opt(5, "steps between lookahead updates")
    lookahead_decay: float = opt(0.95, "lookahead per-step decay: an update keeps "
                                 "decay**every * progress**power of the average")
    lookahead_power: float = opt(3.0, "lookahead: exponent of the training progress in the "
                                 "decay (averages more strongly towards the end)")
    whiten_bias_epochs: int | None = opt(None, "models with a whitening stem: train its bias "
                                         "for this many epochs, then freeze it (default: always)")
    early_stop: int | None = opt(None, "stop after this many epochs without a better "
                                 "validation accuracy", metavar="PATIENCE")
    ema: float | None = opt(None, "keep an exponential moving average of the weights with "
                            "this decay per step (timm uses 0.9998): evaluated, selected, "
                            "tested and saved in place of the trained weights",
                            metavar="DECAY")
    ema_warmup: bool = opt(False, "with --ema: the decay of step t is min(DECAY, "
                           "1 - (1 + t)^(-2/3)) (timm's warm-up), for short runs")
    precise_bn: int = opt(0, "before each evaluation, compute every BatchNorm's running "
                          "statistics again as the average over N fixed training images, seen "
                          "as evaluation sees them (no augmentation, dropout off): detectron2's "
                          "PreciseBN; 0 keeps the running averages of training",
                          metavar="N")
    # --- fine-tuning (Keras's trainable=False, fastai's fine_tune and discriminative rates)
    freeze_features: bool = opt(False, "train the head alone: the convolutional features keep "
                                "their weights and BatchNorm statistics for the whole run "
                                "(Keras's trainable=False); works under torchrun",
                                group="finetune")
    freeze_epochs: int = opt(0, "train the head alone for this many first epochs, then the "
                             "whole network (fastai's fine_tune(freeze_epochs=N)); refused "
                             "under torchrun, whose DistributedDataParallel fixes the "
                             "parameters it synchronises when it wraps the model",
                             group="finetune", metavar="N")
    features_lr_scale: float = opt(1.0, "learning-rate multiplier for the convolutional "
                                   "features (fastai's discriminative rates, e.g. 0.1); "
                                   "multiplies --norm-lr-scale for their BatchNorm",
                                   group="finetune", metavar="F")
    # --- engine
    precision: str = opt("auto", "auto: bf16 autocast where the CPU or GPU computes bf16 "
                         "natively, else fp32", choices=PRECISIONS, group="engine")
    channels_last: bool = opt(True, "NHWC memory format (faster convolutions on CPU and "
                              "tensor cores)", group="engine")
    compile: bool = opt(False, "torch.compile the model", group="engine")
    device: str = opt("auto", "where to train", choices=DEVICES, group="engine")
    threads: int | None = opt(None, "CPU threads (default: all cores)", group="engine")
    seed: int = opt(0, "seed of weights, order, augmentation and dropout", group="engine")
    eval_batch_size: int = opt(512, "images per evaluation step", group="engine")
    sync_bn: bool = opt(False, "synchronised BatchNorm across torchrun processes",
                        group="engine")
    scale_lr: str = opt("none", "under torchrun: 'linear' multiplies --lr by the number of "
                        "processes (Goyal et al. 2017)", choices=SCALE_LR, group="engine")
    # --- output
    out: str | None = opt(None, "run folder (default runs/<dataset>-<model>-<timestamp>)",
                          group="output")
    overwrite: bool = opt(False, "allow writing into an existing non-empty run folder",
                          group="output")
    resume: str | None = opt(None, "continue the run in this folder from its last checkpoint",
                             group="output", metavar="RUN")
    health: bool = opt(True, "one-line training health checks after each epoch (accuracy at "
                       "chance, a stalled loss, exploding or vanishing gradients, dead ReLU "
                       "layers), with what to try; never fatal", group="output")
    log_every: float = opt(30.0, "when the output is not a terminal, a progress line every "
                           "this many seconds within an epoch (0: none)", group="output",
                           metavar="SECONDS")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard extra)",
                            group="output")
    mlflow: str | None = opt(None, "also log to MLflow (the mlflow extra): parameters, "
                             "per-epoch metrics, the summary and the report; a tracking URI, "
                             "or alone for a local ./mlruns store", group="output",
                             metavar="URI", const="mlruns")
    report: bool = opt(True, "write the HTML/Markdown report at the end", group="output")
    tta: bool = opt(False, "final test accuracy averages the horizontally flipped view",
                    group="output")
    tta_translate: int = opt(0, "with --tta, also average the (flipped and unflipped) views "
                             "shifted by this many pixels up-left and down-right (reflect "
                             "padding), weighted as airbench (1: airbench's level 2)",
                             group="output")

    # ----------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        return apply_overrides(self, changes, source="arguments")


FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a config field."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return hint, False


def coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to the field's type; errors name the key and the source."""
    base, optional = field_type(name)
    if name == "lr" and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"  # resolved by a learning-rate range test before training
    where = f"{source}: {name}" if source != "command line" else f"--{name.replace('_', '-')}"
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false",
                                                             "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [float(v) for v in value]
    except (TypeError, ValueError):
        pass
    kind = {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(base, "a list of numbers like 0.9,0.999")
    if name == "lr":
        kind = "a positive number or 'auto'"
    raise UsageError(f"{where} must be {kind}, got {value!r}")


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        key = unknown[0]
        raise UsageError(f"{source}: unknown key {key!r}{did_you_mean(key, FIELDS)}")
    changes = {k: coerce(k, v, source) for k, v in values.items()}
    return validate(dataclasses.replace(config, **changes), source)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config: {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config_file(path: str | Path, *, warn: bool = True) -> dict[str, Any]:
    """``--config FILE``'s options. A run's own config.yaml reused as a template keeps its
    recipe but not its bookkeeping: its ``out``, ``overwrite`` and ``resume`` would send the
    new run into the old folder and replace it, so they are dropped, saying so."""
    from vggkit.runfolder import BOOKKEEPING, written_by_a_run

    values = load_yaml(path)
    if not written_by_a_run(path):
        return values
    acting = [k for k in BOOKKEEPING if values.get(k) not in (None, False)]
    if acting and warn:
        logging.getLogger("vggkit.config").warning(
            "--config %s: written by the run in %s; its %s not used here (a new run folder is "
            "made: give --out DIR, or --resume %s to continue that run)", path,
            Path(path).parent, " and ".join(acting) + (" are" if len(acting) > 1 else " is"),
            Path(path).parent)
    return {k: v for k, v in values.items() if k not in BOOKKEEPING}


def validate(config: TrainConfig, source: str = "command line") -> TrainConfig:
    """Value checks that types alone cannot express."""

    def bad(name: str, why: str) -> UsageError:
        where = f"--{name.replace('_', '-')}" if source == "command line" else f"{source}: {name}"
        return UsageError(f"{where} {why}, got {getattr(config, name)!r}")

    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise unknown_name(f"--{f.name.replace('_', '-')} value", getattr(config, f.name),
                               choices)
    from vggkit.models.registry import ARCHITECTURES, list_heads

    if config.model not in ARCHITECTURES:
        raise unknown_name("--model", config.model, ARCHITECTURES)
    if config.head is not None and config.head not in list_heads():
        raise unknown_name("--head", config.head, list_heads())
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise bad(name, "must be a positive integer")
    if config.lr != "auto" and not config.lr > 0:
        raise bad("lr", "must be positive (or 'auto')")
    for name in ("weight_decay", "warmup_epochs", "decay", "crop_padding", "cutout",
                 "lookahead_start", "lookahead_power", "tta_translate", "log_every"):
        if getattr(config, name) < 0:
            raise bad(name, "must not be negative")
    if not 0 <= config.label_smoothing < 1:
        raise bad("label_smoothing", "must be in [0, 1)")
    if not 0 <= config.dropout < 1:
        raise bad("dropout", "must be in [0, 1)")
    if config.val_split is not None and not (
            0 <= config.val_split < 1 or (config.val_split >= 1 and config.val_split.is_integer())):
        raise bad("val_split", "must be a fraction in [0, 1) or a whole number of images")
    if config.val_split == 0:
        # Nothing may be chosen on the test set: with no validation split there is no signal
        # for these to act on.
        where = "--val-split 0" if source == "command line" else f"{source}: val_split 0"
        if config.schedule == "plateau":
            raise UsageError(f"{where}: no validation split, but --schedule plateau cuts the "
                             "rate on validation accuracy; hold one out or pick another schedule")
        if config.early_stop is not None:
            raise UsageError(f"{where}: no validation split, but --early-stop watches "
                             "validation accuracy; hold one out or drop --early-stop")
    if not 0 <= config.momentum < 1:
        raise bad("momentum", "must be in [0, 1)")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise bad("betas", "must be two numbers in [0, 1), like 0.9,0.999")
    if config.channels is not None and config.channels not in (1, 3):
        raise bad("channels", "must be 1 or 3")
    if config.image_size is not None and config.image_size < 1:
        raise bad("image_size", "must be a positive integer")
    if config.subset is not None and config.subset < 1:
        raise bad("subset", "must be a positive integer")
    if config.threads is not None and config.threads < 1:
        raise bad("threads", "must be a positive integer")
    if config.early_stop is not None and config.early_stop < 1:
        raise bad("early_stop", "must be a positive integer")
    for name in ("step_size", "plateau_patience"):
        if getattr(config, name) < 1:
            raise bad(name, "must be a positive integer")
    if not 0 < config.gamma <= 1:
        raise bad("gamma", "must be in (0, 1]")
    if (len(config.triangle) != 3 or not 0 < config.triangle[1] < 1
            or min(config.triangle[0], config.triangle[2]) < 0):
        raise bad("triangle", "must be START,PEAK,END with factors >= 0 and 0 < PEAK < 1, "
                  "like 0.2,0.23,0.07")
    if not config.norm_lr_scale > 0:
        raise bad("norm_lr_scale", "must be positive")
    if config.lookahead_every < 1:
        raise bad("lookahead_every", "must be a positive integer")
    if not 0 <= config.lookahead_decay <= 1:
        raise bad("lookahead_decay", "must be in [0, 1]")
    if config.whiten_bias_epochs is not None and config.whiten_bias_epochs < 0:
        raise bad("whiten_bias_epochs", "must not be negative")
    if config.image_size is not None:
        check_tta_translate(config, config.image_size, source)
    if config.grad_accum < 1:
        raise bad("grad_accum", "must be a positive integer")
    if config.grad_accum > config.batch_size:
        raise bad("grad_accum", f"must not exceed --batch-size {config.batch_size} (each chunk "
                  "needs an image)")
    if config.time_budget is not None:
        parse_duration(config.time_budget, "--time-budget" if source == "command line"
                       else f"{source}: time_budget")
    validate_photos(config, bad)
    validate_finetune(config, bad)
    validate_regularisers(config, bad)
    return config


def validate_regularisers(config: TrainConfig, bad) -> None:
    if isinstance(config.precise_bn, bool) or not isinstance(config.precise_bn, int) \
            or config.precise_bn < 0:
        raise bad("precise_bn", "must be a number of training images (0 for off), like 5120")
    if config.ema is not None and not 0 < config.ema < 1:
        raise bad("ema", "must be a decay in (0, 1), like 0.999")
    for name in ("mixup", "cutmix"):
        if getattr(config, name) < 0:
            raise bad(name, "must not be negative (0 is off)")
    for name in ("mix_prob", "mix_switch_prob"):
        if not 0 <= getattr(config, name) <= 1:
            raise bad(name, "must be in [0, 1]")
    if config.auto_augment:
        from vggkit.data.autoaugment import Policy

        Policy.parse(config.auto_augment)


DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str, where: str = "--time-budget") -> float:
    """``90m``, ``1.5h``, ``600s``, ``1h30m`` -> seconds."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", text.strip().lower())
    rebuilt = "".join(f"{n}{u}" for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text.strip().lower()):
        raise UsageError(f"{where} {text!r}: give a time with its unit, like 90m, 1.5h, 600s "
                         "or 1h30m")
    seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"{where} {text!r}: must be longer than zero")
    return seconds


def validate_finetune(config: TrainConfig, bad) -> None:
    if not config.features_lr_scale > 0:
        raise bad("features_lr_scale", "must be positive (--freeze-features keeps the "
                  "features fixed)")
    if config.freeze_epochs < 0:
        raise bad("freeze_epochs", "must not be negative")
    if config.freeze_epochs and config.freeze_features:
        raise bad("freeze_epochs", "cannot be combined with --freeze-features, which freezes "
                  "the features for the whole run")
    if config.freeze_epochs >= config.epochs:
        raise bad("freeze_epochs", f"must be smaller than --epochs {config.epochs}, or nothing "
                  "but the head is ever trained (that is --freeze-features)")


def validate_photos(config: TrainConfig, bad) -> None:
    """The photo crop flags: torchvision's RandomResizedCrop ranges and timm's crop_pct."""
    if len(config.crop_scale) != 2 or not 0 < config.crop_scale[0] <= config.crop_scale[1] <= 1:
        raise bad("crop_scale", "must be MIN,MAX with 0 < MIN <= MAX <= 1, like 0.08,1")
    if len(config.crop_ratio) != 2 or not 0 < config.crop_ratio[0] <= config.crop_ratio[1]:
        raise bad("crop_ratio", "must be MIN,MAX with 0 < MIN <= MAX, like 0.75,1.333")
    if not 0 < config.crop_pct <= 1:
        raise bad("crop_pct", "must be in (0, 1]")
    if config.stored_size is not None and config.stored_size < 1:
        raise bad("stored_size", "must be a positive integer")
    if (config.stored_size is not None and config.image_size is not None
            and config.stored_size < config.image_size):
        raise bad("stored_size", f"must be at least --image-size {config.image_size} (the crop "
                  "is taken from the stored photo)")


def check_tta_translate(config: TrainConfig, image_size: int, source: str = "command line") -> None:
    """The shifted test views are cut from a reflect-padded copy, and reflect padding must be
    thinner than the image: so --tta-translate must be smaller than the side. ``validate``
    checks it when --image-size is given; otherwise call this once the side is known (the
    dataset's), before training, so that the run does not fail only at its final test."""
    if config.tta and config.tta_translate >= image_size:
        where = "--tta-translate" if source == "command line" else f"{source}: tta_translate"
        raise UsageError(
            f"{where} {config.tta_translate}: must be smaller than the image side {image_size} "
            "(the shifted test views reflect-pad the image by that many pixels); lower "
            "--tta-translate or raise --image-size")


def resolve_config(
    flags: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    recipe: str | None = None,
) -> TrainConfig:
    """Defaults < recipe < config file < flags."""
    config, given = TrainConfig(), set(flags or ())
    if recipe:
        from vggkit.recipes import load_recipe

        values = load_recipe(recipe)
        config, given = apply_overrides(config, values, source=f"recipe {recipe}"), given | set(values)
    if config_file:
        values = load_config_file(config_file)
        config, given = apply_overrides(config, values, source=str(config_file)), given | set(values)
    if flags:
        config = apply_overrides(config, flags, source="command line")
    return imagenet_defaults(config, given)


def imagenet_defaults(config: TrainConfig, given: set[str]) -> TrainConfig:
    """--init-from imagenet: the weights saw RGB images normalised with ImageNet's mean and
    std, so those are the defaults of --channels and --normalize (unless ``given``)."""
    if config.init_from != IMAGENET_INIT:
        return config
    from vggkit.models.pretrained import weights_file_name

    try:  # before any dataset is loaded
        weights_file_name(config.model)
    except UsageError as exc:
        raise UsageError(f"--init-from imagenet: {exc}") from None
    changes = {k: v for k, v in (("normalize", "imagenet"), ("channels", 3)) if k not in given}
    return dataclasses.replace(config, **changes)
