"""vggkit: train, evaluate and ship VGG-family image classifiers."""

__version__ = "0.1.0"

from vggkit.errors import VggkitError  # noqa: E402
from vggkit.models import create_model  # noqa: E402

__all__ = ["VggkitError", "__version__", "create_model"]
