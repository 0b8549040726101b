"""``vggkit import-keras MODEL.keras|MODEL.h5 --out RUN``: a Keras network and its weights as a
vggkit run folder (a checkpoint and its config), which ``evaluate``, ``report``, ``predict``,
``export --onnx`` and ``train --init-from`` take as they take a trained run.

The file is read and converted by :mod:`vggkit.models.keras` (no TensorFlow, no Keras, no code
executed). Where the layers are a registered network layer for layer (the write-ups' VGG-19 with
the BatchNorm head, the classic VGG-16, the compact net, the MNIST-64 VGG-16, torchvision-style
VGGs), the run holds that network, with Keras's BatchNorm epsilon and momentum kept; any other
stack of the supported layers is kept as its exact PyTorch equivalent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.models.keras import (
    Converted,
    convert,
    load_into,
    match_registered,
    norm_settings,
    read_keras,
)
from vggkit.runfolder import RunFolder
from vggkit.training.checkpoint import KERAS, save_checkpoint

NORMALIZE = ("unit", "imagenet")


def known_classes(dataset: str) -> list[str] | None:
    """The class names of the official datasets, without reading them."""
    from vggkit.data.sources.idx import FASHION_CLASSES, MNIST_CLASSES
    from vggkit.data.testing import CIFAR10_CLASSES

    return {"cifar10": CIFAR10_CLASSES, "mnist": MNIST_CLASSES, "digits": MNIST_CLASSES,
            "fashion-mnist": FASHION_CLASSES}.get(dataset)


def read_classes(path: str | None, n: int, dataset: str) -> list[str]:
    if path is None:
        names = known_classes(dataset)
        if names is None:
            raise UsageError(f"--dataset {dataset}: give its class names in output order with "
                             "--classes FILE (one a line)")
        if len(names) != n:
            raise UsageError(f"--dataset {dataset} has {len(names)} classes, the network "
                             f"{n} outputs")
        return list(names)
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"--classes {path}: cannot read it ({exc.strerror or exc})") from None
    if len(names) != n:
        raise UsageError(f"--classes {path}: {len(names)} names, the network has {n} outputs")
    return names


def import_keras(path: str | Path, out: str | Path, *, normalize: str = "unit",
                 classes: str | None = None, dataset: str, overwrite: bool = False
                 ) -> dict[str, Any]:
    """Write the run folder; returns what was imported (the match, counts, the folder)."""
    if normalize not in NORMALIZE:
        raise UsageError(f"--normalize {normalize!r}: expected one of {', '.join(NORMALIZE)} "
                         "(pixels / 255, as the write-ups train; or ImageNet's mean and std)")
    keras_model = read_keras(path)
    converted = convert(keras_model)
    h, w, c = converted.input_shape
    if h != w or c not in (1, 3):
        raise UsageError(f"{path}: input {h}x{w}x{c}; vggkit networks take square images of 1 or "
                         "3 channels")
    model, model_meta = _network(converted)
    names = read_classes(classes, converted.num_classes, dataset)
    if normalize == "imagenet":
        from vggkit.models.pretrained import imagenet_mean_std

        mean, std = imagenet_mean_std(c)
    else:
        mean, std = [0.0] * c, [1.0] * c
    config = TrainConfig(model=model_meta["name"] if model_meta["name"] != KERAS else "vgg_compact",
                         head=model_meta.get("head"), dropout=model_meta.get("dropout", 0.5),
                         dataset=dataset, image_size=h, channels=c,
                         normalize="unit" if normalize == "unit" else "imagenet",
                         precision="fp32", out=str(out)).to_dict()
    config["model"] = model_meta["name"]
    run = RunFolder(out).create(resuming=False, overwrite=overwrite)
    meta = {"config": config, "classes": names, "mean": list(mean), "std": list(std),
            "image_shape": [c, h, h], "photo": None, "model": model_meta,
            "dataset": {"name": dataset, "train": 0, "test": 0, "val": 0},
            "world_size": 1, "precision": "fp32", "epoch": 0, "batch": 0,
            "best": {"acc": -1.0, "epoch": 0}, "stale_epochs": 0, "stopped_early": False,
            "schedule_state": {"factor": 1.0, "best": None, "bad": 0},
            "keras": {"file": Path(path).name, "layers": len(keras_model.layers),
                      "softmax_dropped": converted.softmax_dropped}}
    save_checkpoint(run.checkpoint("last"), model.state_dict(), meta)
    run.write_config(_yaml(config))
    params = sum(p.numel() for p in model.parameters())
    moving = sum(b.numel() for n, b in model.named_buffers()
                 if n.endswith(("running_mean", "running_var")))
    return {"run": str(run), "model": model_meta["name"], "head": model_meta.get("head"),
            "matched": model_meta["name"] != KERAS, "params": params + moving,
            "num_classes": converted.num_classes, "input": [c, h, w]}


def _network(converted: Converted):
    from vggkit.models import create_model

    c, h = converted.input_shape[2], converted.input_shape[0]
    match = match_registered(converted)
    if match is None:
        meta = {"name": KERAS, "head": None, "num_classes": converted.num_classes,
                "in_channels": c, "input_size": h, "layers": converted.layers,
                "norm": norm_settings(converted.module)}
        return converted.module, meta
    name, head, dropout = match
    model = create_model(name, num_classes=converted.num_classes, in_channels=c, input_size=h,
                         head=head, dropout=dropout)
    load_into(model, converted.module)
    meta = {"name": name, "head": head, "num_classes": converted.num_classes, "in_channels": c,
            "input_size": h, "dropout": dropout, "norm": norm_settings(model)}
    return model, meta


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
