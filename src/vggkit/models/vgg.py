"""VGG networks built from tables, torchvision-style: a layer configuration for the
convolutional stack and a head chosen by name. New variants are rows in these tables.

Module layout and parameter names follow torchvision's ``VGG`` (``features.N``,
``avgpool``, ``classifier.N``) so that its state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

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
    # airbench94 (Jordan 2024): three groups conv -> pool -> conv, widths 64/256/256.
    "airbench": [64, "M", 64, 256, "M", 256, 256, "M", 256],
}

# Heads: (pooling before flatten, classifier layers). A layer is "relu", "dropout", "bn"
# (BatchNorm1d of the current width), an int (a dense layer of that width), "out" (the
# final dense layer to the classes), "out-nobias" (the same without a bias) or "scale:F"
# (multiply the logits by the constant F, e.g. "scale:1/9"). "pool7" is torchvision's 7x7
# adaptive average pool, "gap" a global average pool, "gmp" a global max pool, None keeps
# the feature map as it is.
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
    # airbench94: max-pool to 1x1, a dense layer without bias, logits scaled by 1/9.
    "airbench": ("gmp", ["out-nobias", "scale:1/9"]),
}

ACTIVATIONS = ("relu", "gelu")
BLOCK_ORDERS = ("conv-bn-relu", "conv-relu-bn", "conv-pool-bn-act")
INITS = ("torchvision", "airbench")


@dataclass(frozen=True)
class Architecture:
    """One registered network: a conv configuration plus how its blocks are built."""

    config: str
    batch_norm: bool = False
    # "conv-bn-relu" (torchvision), "conv-relu-bn" (the compact Keras net) or
    # "conv-pool-bn-act" (airbench: a convolution followed by "M" is pooled before its
    # BatchNorm and activation; the others are conv-bn-act).
    block_order: str = "conv-bn-relu"
    # Dropout rates after each max-pool (empty: none).
    pool_dropout: tuple[float, ...] = ()
    default_head: str = "linear"
    description: str = ""
    # "relu" or "gelu" (exact, erf-based: nn.GELU()).
    activation: str = "relu"
    conv_bias: bool = True
    # BatchNorm2d eps and momentum (PyTorch convention: the weight of the new batch);
    # bn_scale=False freezes BatchNorm's multiplicative weight at 1 (only its bias learns).
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    bn_scale: bool = True
    # > 0: a stem before the VGG stack, a frozen whitening convolution with this kernel
    # (no padding, so the side shrinks by kernel - 1) and 2 * channels * kernel**2 filters
    # (each eigenvector of the training images' patch covariance and its negative; set by
    # :func:`init_whitening` from data), then the activation. Its bias trains.
    whiten_kernel: int = 0
    # "torchvision" (Kaiming-normal convolutions, N(0, 0.01) dense layers) or "airbench"
    # (PyTorch's default initialisation, every 3x3 convolution's first C_in filters set to
    # the identity: an implicit residual).
    init: str = "torchvision"

    @property
    def num_pools(self) -> int:
        return CONV_CONFIGS[self.config].count("M")

    def whiten_width(self, in_channels: int) -> int:
        return 2 * in_channels * self.whiten_kernel**2 if self.whiten_kernel else 0

    def feature_side(self, input_size: int) -> int:
        """Side of the last feature map (pools floor odd sides, as nn.MaxPool2d does)."""
        side = input_size - max(0, self.whiten_kernel - 1)
        for _ in range(self.num_pools):
            side //= 2
        return side

    @property
    def out_channels(self) -> int:
        return [c for c in CONV_CONFIGS[self.config] if c != "M"][-1]


def _activation(arch: Architecture) -> nn.Module:
    return nn.GELU() if arch.activation == "gelu" else nn.ReLU(inplace=True)


def _batch_norm(arch: Architecture, width: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(width, eps=arch.bn_eps, momentum=arch.bn_momentum)
    if not arch.bn_scale:
        bn.weight.requires_grad_(False)
    return bn


def make_features(arch: Architecture, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    if arch.whiten_kernel:
        width = arch.whiten_width(in_channels)
        whiten = nn.Conv2d(channels, width, kernel_size=arch.whiten_kernel, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        layers += [whiten, _activation(arch)]
        channels = width
    items = CONV_CONFIGS[arch.config]
    pool_index = 0

    def pool() -> list[nn.Module]:
        nonlocal pool_index
        out: list[nn.Module] = [nn.MaxPool2d(kernel_size=2, stride=2)]
        if arch.pool_dropout:
            out.append(nn.Dropout(arch.pool_dropout[pool_index]))
        pool_index += 1
        return out

    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if item == "M":
            layers += pool()
            continue
        width = int(item)
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=arch.conv_bias)
        if not arch.batch_norm:
            layers += [conv, _activation(arch)]
        elif arch.block_order == "conv-relu-bn":
            layers += [conv, _activation(arch), _batch_norm(arch, width)]
        elif arch.block_order == "conv-pool-bn-act" and i < len(items) and items[i] == "M":
            i += 1
            layers += [conv, *pool(), _batch_norm(arch, width), _activation(arch)]
        else:
            layers += [conv, _batch_norm(arch, width), _activation(arch)]
        channels = width
    return nn.Sequential(*layers)


class Scale(nn.Module):
    """Multiply by a constant (airbench's logit scale)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


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
        elif item == "out-nobias":
            layers.append(nn.Linear(width, num_classes, bias=False))
        elif isinstance(item, str) and item.startswith("scale:"):
            layers.append(Scale(float(Fraction(item.split(":", 1)[1]))))
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
        side = arch.feature_side(input_size)
        if pool == "pool7":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
            side = 7
        elif pool == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            side = 1
        elif pool == "gmp":
            self.avgpool = nn.AdaptiveMaxPool2d((1, 1))
            side = 1
        else:
            self.avgpool = nn.Identity()
        # A module rather than torch.flatten so that summaries list it, as Keras does;
        # it holds no state, so torchvision's state-dict keys are unchanged.
        self.flatten = nn.Flatten(1)
        self.classifier = make_head(head, arch.out_channels * side * side, num_classes, dropout)
        initialise(self, arch.init)

    @property
    def whitening(self) -> nn.Conv2d | None:
        """The frozen patch-whitening stem convolution, if the architecture has one."""
        first = self.features[0] if len(self.features) else None
        if isinstance(first, nn.Conv2d) and not first.weight.requires_grad:
            return first
        return None

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
    if arch.whiten_kernel:
        # The stem takes kernel - 1 pixels off; the pools floor odd sides (31 -> 15 -> 7 -> 3).
        least = factor + arch.whiten_kernel - 1
        if input_size < least:
            raise UsageError(
                f"image size {input_size}: {label} has a {arch.whiten_kernel}x"
                f"{arch.whiten_kernel} whitening stem and {arch.num_pools} 2x2 max-pools, so "
                f"its input side must be at least {least}; set --image-size (train) or --input "
                "(summary)"
            )
        return
    if HEADS[head][0] is not None:
        # An adaptive pool before the classifier (torchvision's 7x7 one included) takes any
        # feature-map side, so only the pools' need of at least one pixel remains.
        if input_size < factor:
            raise UsageError(
                f"image size {input_size}: {label} has {arch.num_pools} 2x2 max-pools, so its "
                f"input side must be at least {factor}; set --image-size (train) or --input "
                "(summary)"
            )
        return
    if input_size < factor or input_size % factor:
        raise UsageError(
            f"image size {input_size}: {label} has {arch.num_pools} 2x2 max-pools, so its input "
            f"side must be a multiple of {factor} and at least {factor} (e.g. {factor}, "
            f"{2 * factor}, {7 * factor}); set --image-size (train) or --input (summary)"
        )


def initialise(model: nn.Module, scheme: str = "torchvision") -> None:
    """``torchvision``: as torchvision's VGG does (the lineage of the VGG paper's Caffe code):
    Kaiming-normal convolutions (fan-out, ReLU gain), N(0, 0.01) dense layers, zero biases,
    BatchNorm weight 1 and bias 0. ``airbench``: PyTorch's default initialisation (as the
    layers were built), zero convolution biases, and the first C_in filters of every 3x3
    convolution set to the identity (``nn.init.dirac_``)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if scheme == "airbench":
                if module.kernel_size == (3, 3):
                    with torch.no_grad():
                        w = module.weight
                        nn.init.dirac_(w[: min(w.shape[0], w.shape[1])])
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and scheme != "airbench":
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def patch_covariance(images: torch.Tensor, kernel: int, chunk: int = 500) -> torch.Tensor:
    """Covariance (uncentred second moment, as airbench) of all ``kernel`` x ``kernel``
    patches of ``images`` (N, C, H, W), over C*k*k features in (c, i, j) order; float64."""
    c = images.shape[1]
    dim = c * kernel * kernel
    acc = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64)
        # (n, c*k*k, L) columns in (c, i, j) order, the order of a conv weight's flattening.
        cols = nn.functional.unfold(x, kernel).transpose(1, 2).reshape(-1, dim)
        acc += cols.T @ cols
        count += cols.shape[0]
    return acc / max(1, count)


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a whitening convolution from normalised training images, as airbench does: the
    eigenvectors of the patch covariance scaled by 1 / sqrt(eigenvalue + eps), largest first,
    then the same negated (so that GELU passes both signs). Its outputs' first half then has
    approximately identity covariance over the images' patches."""
    k = conv.kernel_size[0]
    c = conv.in_channels
    if conv.out_channels != 2 * c * k * k or images.shape[1] != c:
        raise ValueError(f"whitening conv {tuple(conv.weight.shape)} does not fit images "
                         f"{tuple(images.shape)}")
    cov = patch_covariance(images, k)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first
    scaled = eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    weight = torch.cat([scaled, -scaled]).reshape(2 * c * k * k, c, k, k)
    conv.weight.copy_(weight.to(conv.weight.dtype))
