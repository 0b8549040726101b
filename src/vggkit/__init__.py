"""vggkit: train, evaluate and ship VGG-family image classifiers.

The public API mirrors the CLI::

    import vggkit
    model = vggkit.create_model("vgg16_bn", num_classes=10)
    result = vggkit.train(vggkit.TrainConfig(model="vgg11_bn", dataset="digits", epochs=5))
    metrics = vggkit.evaluate(result["run"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "vggkit.models",
    "list_models": "vggkit.models",
    "load_dataset": "vggkit.data",
    "TrainConfig": "vggkit.config",
    "train": "vggkit.workflow",
    "evaluate": "vggkit.evaluation",
    "predict": "vggkit.evaluation",
    "VggkitError": "vggkit.errors",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import vggkit` (and `vggkit --help`) stays quick.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vggkit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
