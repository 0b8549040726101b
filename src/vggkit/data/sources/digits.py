"""scikit-learn's bundled 8x8 digits: 1,797 images, always available offline."""

from __future__ import annotations

import numpy as np

from vggkit.data.sources.base import RawData
from vggkit.data.split import stratified_split

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed, independent of the training seed, so the test set never changes


def load_digits_data() -> RawData:
    """The digits as uint8 (N, 1, 8, 8) in 0..255 with a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits  # deferred: sklearn's import is slow

    bunch = load_digits()
    # Pixels are 0..16 ink counts; scale to the full uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return RawData(
        [str(i) for i in range(10)],
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        "sklearn.datasets.load_digits",
    )
