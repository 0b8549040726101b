"""VGG networks built from tables, torchvision-style: a layer configuration for the
convolutional stack and a head chosen by name. New variants are rows in these tables.

Module layout and parameter names follow torchvision's ``VGG`` (``features.N``,
``avgpool``, ``classifier.N``) so that its state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vggkit.errors import UsageError

# Convolution widths; "M" is a 2x2 max-pool. A-E as in Simonyan & Zisserman (2014), table 1.
CONV_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    # The compact 6-conv VGG-style net that CIFAR-10 tutorials publish.
    "compact": [32, 32, "M", 64, 64, "M", 128, 128, "M"],
}

# Heads: (pooling before flatten, classifier layers). A layer is "relu", "dropout", "bn"
# (BatchNorm1d of the current width), an int (a dense layer of that width) or "out" (the
# final dense layer to the classes). "pool7" is torchvision's 7x7 adaptive average pool,
# "gap" a global average pool, None keeps the feature map as it is.
HEADS: dict[str, tuple[str | None, list[int | str]]] = {
    # Flatten -> 4096 -> 4096 -> n with dropout: the Keras VGG-16 of CIFAR write-ups.
    "classic": (None, [4096, "relu", "dropout", 4096, "relu", "dropout", "out"]),
    # BatchNorm between the dense layers (Keras BatchNormalization placement).
    "bn": (None, ["bn", 4096, "relu", "dropout", "bn", 4096, "relu", "dropout", "bn",
                  1000, "relu", "bn", "out"]),
    "gap": ("gap", ["out"]),
    "linear": (None, ["out"]),
    "imagenet": ("pool7", [4096, "relu", "dropout", 4096, "relu", "dropout", "out"]),
    "compact": (None, [1024, "relu", "bn", "dropout", 100, "relu", "bn", "out"]),
}


@dataclass(frozen=True)
class Architecture:
    """One registered network: a conv configuration plus how its blocks are built."""

    config: str
    batch_norm: bool = False
    # "conv-bn-relu" (torchvision) or "conv-relu-bn" (the compact Keras net).
    block_order: str = "conv-bn-relu"
    # Dropout rates after each max-pool (empty: none).
    pool_dropout: tuple[float, ...] = ()
    default_head: str = "linear"
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def num_pools(self) -> int:
        return CONV_CONFIGS[self.config].count("M")

    @property
    def out_channels(self) -> int:
        return [c for c in CONV_CONFIGS[self.config] if c != "M"][-1]


def make_features(arch: Architecture, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    pool_index = 0
    for item in CONV_CONFIGS[arch.config]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            if arch.pool_dropout:
                layers.append(nn.Dropout(arch.pool_dropout[pool_index]))
            pool_index += 1
            continue
        width = int(item)
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        if not arch.batch_norm:
            layers += [conv, nn.ReLU(inplace=True)]
        elif arch.block_order == "conv-bn-relu":
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        else:
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(width)]
        channels = width
    return nn.Sequential(*layers)


def make_head(head: str, in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    _, spec = HEADS[head]
    layers: list[nn.Module] = []
    width = in_features
    for item in spec:
        if item == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif item == "dropout":
            layers.append(nn.Dropout(dropout))
        elif item == "bn":
            layers.append(nn.BatchNorm1d(width))
        elif item == "out":
            layers.append(nn.Linear(width, num_classes))
        else:
            layers.append(nn.Linear(width, int(item)))
            width = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A VGG network: ``features`` -> ``avgpool`` -> flatten -> ``classifier``."""

    def __init__(
        self,
        arch: Architecture,
        *,
        num_classes: int,
        in_channels: int,
        input_size: int,
        head: str,
        dropout: float = 0.5,
        name: str = "",
    ) -> None:
        super().__init__()
        check_input(arch, head, in_channels, input_size, num_classes, name)
        self.name = name
        self.head = head
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.features = make_features(arch, in_channels)
        pool, _ = HEADS[head]
        side = input_size // 2**arch.num_pools
        if pool == "pool7":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
            side = 7
        elif pool == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            side = 1
        else:
            self.avgpool = nn.Identity()
        # A module rather than torch.flatten so that summaries list it, as Keras does;
        # it holds no state, so torchvision's state-dict keys are unchanged.
        self.flatten = nn.Flatten(1)
        self.classifier = make_head(head, arch.out_channels * side * side, num_classes, dropout)
        initialise(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Plain Python ints: cheap, and traceable by torch.compile and the ONNX exporter.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UsageError(
                f"model {self.name or 'vgg'} takes input of shape (N, {self.in_channels}, "
                f"{self.input_size}, {self.input_size}); got {tuple(x.shape)}"
            )
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)


def check_input(
    arch: Architecture, head: str, in_channels: int, input_size: int, num_classes: int, name: str
) -> None:
    """Reject sizes and channel counts the network cannot take, naming the constraint."""
    label = name or arch.config
    if head not in HEADS:
        from vggkit.errors import unknown_name

        raise unknown_name("head", head, HEADS)
    if in_channels < 1:
        raise UsageError(f"--channels: {label} needs at least 1 input channel, got {in_channels}")
    if num_classes < 2:
        raise UsageError(f"--classes: a classifier needs at least 2 classes, got {num_classes}")
    factor = 2**arch.num_pools
    if input_size < factor or input_size % factor:
        raise UsageError(
            f"image size {input_size}: {label} has {arch.num_pools} 2x2 max-pools, so its input "
            f"side must be a multiple of {factor} and at least {factor} (e.g. {factor}, "
            f"{2 * factor}, {7 * factor}); set --image-size (train) or --input (summary)"
        )


def initialise(model: nn.Module) -> None:
    """Initialise as torchvision's VGG does (the lineage of the VGG paper's Caffe code):
    Kaiming-normal convolutions (fan-out, ReLU gain), N(0, 0.01) dense layers, zero biases,
    BatchNorm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
