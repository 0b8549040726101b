"""Load weights in torchvision's VGG state-dict layout (``features.N.weight``,
``classifier.N.weight``): what users of ImageNet-pretrained VGG have on disk."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vggkit.errors import CheckpointError


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same key, other shape

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for label, keys in (
            ("not in the file (kept initialised)", self.missing),
            ("not used", self.unexpected),
            ("shape mismatch (kept initialised)", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def _load_error(exc: Exception) -> str:
    """torch.load's failure in one line (its weights-only refusal is a page of advice)."""
    text = str(exc)
    if "Weights only load failed" in text:
        _, _, reason = text.partition("WeightsUnpickler error:")
        reason = reason.strip()
        detail = f" ({reason.splitlines()[0].strip()})" if reason else ""
        return f"not a torch.save file of tensors that loads without running code{detail}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or a torch file through
    ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice: the error says it
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault
        raise CheckpointError(f"cannot read weights from {path}: {_load_error(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # DataParallel/DDP checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    partial: bool = False,
    only_features: bool | None = None,
    source: str = "weights",
) -> LoadReport:
    """Copy the tensors of ``state`` whose key and shape match the model.

    With the ``imagenet`` head every key must match (identical outputs to torchvision).
    With other heads only the convolutional ``features`` are taken, for fine-tuning;
    the dense layers stay initialised and are reported. Anything else that does not
    match is an error unless ``partial``.
    """
    own = model.state_dict()
    if only_features is None:
        only_features = getattr(model, "head", "imagenet") != "imagenet"
    report = LoadReport()
    take: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if only_features and not key.startswith("features."):
            report.unexpected.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            take[key] = value
    for key in own:
        if key not in take and not any(m.startswith(key + " ") for m in report.mismatched):
            if only_features and not key.startswith("features."):
                continue
            report.missing.append(key)
    head_keys = [k for k in own if not k.startswith("features.")] if only_features else []
    problems = report.mismatched + [k for k in report.missing if not k.endswith("num_batches_tracked")]
    if not only_features:
        problems += report.unexpected
    if problems and not partial:
        raise CheckpointError(
            f"{source} does not match the model ({report}); pass --partial to load what matches"
        )
    if not take:
        raise CheckpointError(f"{source}: no tensor matches the model ({report})")
    model.load_state_dict(take, strict=False)
    report.loaded = list(take)
    report.missing += head_keys
    return report


def conv_positions(config: str, batch_norm: bool, block_order: str = "conv-bn-relu",
                   pool_dropout: bool = False) -> list[tuple[int, int, int, int | None]]:
    """(stage, index in stage, conv module index, BatchNorm module index) for each conv of
    a CONV_CONFIGS entry, as ``make_features`` lays them out."""
    from vggkit.models.vgg import CONV_CONFIGS

    out = []
    index = stage = in_stage = 0
    for item in CONV_CONFIGS[config]:
        if item == "M":
            index += 2 if pool_dropout else 1
            stage += 1
            in_stage = 0
            continue
        bn = None
        if batch_norm:
            bn = index + 1 if block_order == "conv-bn-relu" else index + 2
        out.append((stage, in_stage, index, bn))
        index += 3 if batch_norm else 2
        in_stage += 1
    return out


def remap_stagewise(state: dict[str, torch.Tensor], source_arch, target_arch) -> dict[str, torch.Tensor]:
    """Rename a shallower VGG's conv layers onto a deeper one's, stage by stage: the k-th
    conv of each pooling stage initialises the k-th conv of the same stage, as the VGG paper
    initialised nets B-E from net A. Dense layers keep their names."""
    def positions(arch):
        return {
            (s, i): (c, b)
            for s, i, c, b in conv_positions(arch.config, arch.batch_norm, arch.block_order,
                                             bool(arch.pool_dropout))
        }

    src, dst = positions(source_arch), positions(target_arch)
    renames: dict[str, str] = {}
    for key, (src_conv, src_bn) in src.items():
        if key not in dst:
            continue
        dst_conv, dst_bn = dst[key]
        renames[f"features.{src_conv}."] = f"features.{dst_conv}."
        if src_bn is not None and dst_bn is not None:
            renames[f"features.{src_bn}."] = f"features.{dst_bn}."
    out = {}
    for name, value in state.items():
        if name.startswith("features."):
            prefix = ".".join(name.split(".")[:2]) + "."
            if prefix not in renames:
                continue
            name = renames[prefix] + name[len(prefix):]
        out[name] = value
    return out


def torchvision_architecture(state: dict[str, torch.Tensor], source: str) -> tuple[str, int, int]:
    """(registered model name, input channels, classes) of a state dict in torchvision's VGG
    layout, told from its convolutions' module indices and widths (VGG-11..19, with or
    without BatchNorm) and the width of ``classifier.6``."""
    from vggkit.models.registry import ARCHITECTURES
    from vggkit.models.vgg import CONV_CONFIGS

    convs = sorted(
        (int(k.split(".")[1]), v) for k, v in state.items()
        if k.startswith("features.") and k.endswith(".weight") and k.count(".") == 2
        and k.split(".")[1].isdigit() and v.dim() == 4
    )
    if not convs:
        shown = ", ".join(list(state)[:4]) or "none"
        raise CheckpointError(f"{source}: not a VGG state dict in torchvision's layout (no "
                              f"features.N.weight convolutions; its first keys: {shown})")
    batch_norm = any(k.startswith("features.") and k.endswith(".running_mean") for k in state)
    indices = [i for i, _ in convs]
    widths = [int(w.shape[0]) for _, w in convs]
    for name in (f"vgg{d}{'_bn' if batch_norm else ''}" for d in (11, 13, 16, 19)):
        arch = ARCHITECTURES[name]
        expected = [c for _, _, c, _ in conv_positions(arch.config, arch.batch_norm)]
        if indices == expected and widths == [w for w in CONV_CONFIGS[arch.config] if w != "M"]:
            break
    else:
        raise CheckpointError(
            f"{source}: its {len(convs)} convolutions (widths {'-'.join(map(str, widths))}) are "
            f"not those of VGG-11/13/16/19{' with BatchNorm' if batch_norm else ''} in "
            "torchvision's layout")
    head = state.get("classifier.6.weight")
    if head is None or head.dim() != 2:
        raise CheckpointError(f"{source}: {name}'s convolutions but not torchvision's classifier "
                              "(no classifier.6.weight)")
    return name, int(convs[0][1].shape[1]), int(head.shape[0])


def load_torchvision_vgg(path: str | Path, input_size: int = 224) -> nn.Module:
    """A torchvision-layout VGG weights file (.pth/.pt) as a vggkit network with the
    ``imagenet`` head, every tensor loaded (eval mode)."""
    from vggkit.models.registry import create_model

    state = read_state_dict(path)
    name, in_channels, num_classes = torchvision_architecture(state, str(path))
    model = create_model(name, num_classes=num_classes, in_channels=in_channels,
                         input_size=input_size, head="imagenet")
    own = model.state_dict()
    report = LoadReport(
        # Weights saved before PyTorch 0.4.1 have no BatchNorm batch counters.
        missing=[k for k in own if k not in state and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in state if k not in own],
        mismatched=[f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and v.shape != own[k].shape],
    )
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointError(f"{path}: not a torchvision-layout {name} state dict ({report})")
    model.load_state_dict(state, strict=False)
    return model.eval()


def without_last_layer(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the model's last classifier layer, so that it stays initialised: the
    head is reset for other classes (timm's ``reset_classifier``, Keras's new top)."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return {k: v for k, v in state.items() if not k.startswith(last + ".")}
