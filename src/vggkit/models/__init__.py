"""VGG networks: the builder, the registry, summaries and weight loading."""

from vggkit.models.registry import (
    ARCHITECTURES,
    count_parameters,
    create_model,
    get_architecture,
    list_heads,
    list_models,
)
from vggkit.models.summary import format_summary, summary_dict
from vggkit.models.vgg import CONV_CONFIGS, HEADS, VGG, Architecture
from vggkit.models.weights import (
    LoadReport,
    load_matching,
    load_torchvision_vgg,
    read_state_dict,
    torchvision_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "CONV_CONFIGS",
    "HEADS",
    "VGG",
    "Architecture",
    "LoadReport",
    "count_parameters",
    "create_model",
    "format_summary",
    "get_architecture",
    "list_heads",
    "list_models",
    "load_matching",
    "load_torchvision_vgg",
    "read_state_dict",
    "summary_dict",
    "torchvision_architecture",
]
