"""Datasets and the batch loader.

``load_dataset(name, ...)`` returns a ``Dataset`` of uint8 (N, C, H, W) tensors with int64 labels;
``Loader`` turns a split into seeded, sharded, augmented, normalised batches on the training device.
"""

from vggkit.data.datasets import DATASET_NAMES, Dataset, list_datasets, load_dataset
from vggkit.data.loader import Augment, Loader

__all__ = ["DATASET_NAMES", "Augment", "Dataset", "Loader", "list_datasets", "load_dataset"]
