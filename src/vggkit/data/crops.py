"""Which crops a run's photos get: the one place that turns its flags into photo crops.

Training takes ``--random-resized-crop`` (with ``--crop-scale``/``--crop-ratio``) or else the
evaluation crop, with ``--flip``; validation, the test, ``evaluate`` and ``predict`` take the
evaluation crop (resize the shorter side to ``--image-size / --crop-pct``, center crop), read
back from the run's checkpoint so that they prepare photos exactly as training did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vggkit.data.sources.folder import MAX_COMMON_SIDE
from vggkit.data.sources.photos import STORED_FACTOR
from vggkit.data.store import MappedImages


def native_side(dataset: Any) -> tuple[int, bool]:
    """(the side the dataset's images call for, whether it is a photo folder): for photos
    the crop their stored side was made for; for images that are not square (every one
    640x480, say) the shorter side, at most MAX_COMMON_SIDE, as a folder of mixed sizes."""
    height, width = (int(v) for v in dataset.x_train.shape[-2:])
    if isinstance(dataset.x_train, MappedImages):
        return max(1, math.floor(width / STORED_FACTOR)), True
    if height != width:
        return min(height, width, MAX_COMMON_SIDE), False
    return width, False


def _get(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def photo_crops(config: Any, size: int) -> tuple[Any, Any]:
    """(training crop, evaluation crop) at ``size`` for a TrainConfig or a saved config dict."""
    from vggkit.data.photo import PhotoCrop

    scale = tuple(_get(config, "crop_scale", (0.08, 1.0)))
    ratio = tuple(_get(config, "crop_ratio", (0.75, 4 / 3)))
    pct = float(_get(config, "crop_pct", 0.875))
    train = PhotoCrop(train=bool(_get(config, "random_resized_crop", False)), size=size,
                      scale=scale, ratio=ratio, crop_pct=pct, flip=bool(_get(config, "flip", False)))
    return train, PhotoCrop(train=False, size=size, scale=scale, ratio=ratio, crop_pct=pct, flip=False)


def eval_crop(meta: Mapping[str, Any]) -> Any:
    """The evaluation crop of a checkpoint trained on photos, else None."""
    if not meta.get("photo"):
        return None
    return photo_crops(meta.get("config", {}), int(meta["image_shape"][1]))[1]
