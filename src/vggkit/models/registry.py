"""The model registry: ``create_model("vgg16_bn", num_classes=10)``, timm-style."""

from __future__ import annotations

from torch import nn

from vggkit.errors import UsageError, unknown_name
from vggkit.models.vgg import HEADS, VGG, Architecture

_DEPTH = {"A": 11, "B": 13, "D": 16, "E": 19}

ARCHITECTURES: dict[str, Architecture] = {}
for _config, _depth in _DEPTH.items():
    ARCHITECTURES[f"vgg{_depth}"] = Architecture(
        _config, description=f"VGG-{_depth} (configuration {_config}), no BatchNorm"
    )
    ARCHITECTURES[f"vgg{_depth}_bn"] = Architecture(
        _config, batch_norm=True, description=f"VGG-{_depth} (configuration {_config}), conv-BN-ReLU"
    )
ARCHITECTURES["vgg_compact"] = Architecture(
    "compact",
    batch_norm=True,
    block_order="conv-relu-bn",
    pool_dropout=(0.2, 0.3, 0.4),
    default_head="compact",
    description="compact 6-conv VGG-style net (32-32-64-64-128-128), conv-ReLU-BN, dropout after pools",
)
ARCHITECTURES["vgg_airbench"] = Architecture(
    "airbench",
    batch_norm=True,
    block_order="conv-pool-bn-act",
    activation="gelu",
    conv_bias=False,
    bn_eps=1e-12,
    bn_momentum=0.4,  # airbench's "batchnorm_momentum 0.6" in PyTorch's convention (1 - 0.6)
    bn_scale=False,
    whiten_kernel=2,
    init="airbench",
    default_head="airbench",
    description="airbench94's net: frozen 2x2 whitening stem (3->24), 3 groups conv-pool-BN-GELU "
                "-> conv-BN-GELU (64/256/256), max-pool, linear x 1/9",
)


def list_models() -> list[str]:
    return list(ARCHITECTURES)


def list_heads() -> list[str]:
    return list(HEADS)


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise unknown_name("model", name, ARCHITECTURES)
    return ARCHITECTURES[name]


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    head: str | None = None,
    dropout: float = 0.5,
) -> VGG:
    """Build a registered network with freshly initialised weights.

    ``head`` defaults to the architecture's own (``linear`` for VGG-11..19: flatten ->
    dense n, the common CIFAR VGG; ``compact`` for ``vgg_compact``).
    """
    arch = get_architecture(name)
    head = head or arch.default_head
    if head not in HEADS:
        raise unknown_name("head", head, HEADS)
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    return VGG(
        arch,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        head=head,
        dropout=dropout,
        name=name,
    )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Keras-style counts: trainable parameters, plus BatchNorm moving mean and variance as
    non-trainable (Keras counts those as weights; PyTorch keeps them as buffers)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    moving = sum(
        b.numel()
        for name, b in model.named_buffers()
        if name.endswith("running_mean") or name.endswith("running_var")
    )
    return {
        "total": trainable + frozen + moving,
        "trainable": trainable,
        "non_trainable": frozen + moving,
    }
