"""Datasets (STL-10, any ImageFolder) as in-memory uint8 tensors, splits, batches and batched augmentation.

Knows nothing of Optuna or the models.
"""

from data.batching import TrainSampler, eval_batch_size, padded_batches
from data.imageset import DataError, ImageSet, fingerprint_of, printable
from data.loading import DATASETS, default_data_root, load_images
from data.splits import stratified_split
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment, augment_with, augmentation_examples, normalize

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "ImageSet",
    "TrainSampler",
    "augment",
    "augment_with",
    "augmentation_examples",
    "default_data_root",
    "eval_batch_size",
    "fingerprint_of",
    "load_images",
    "normalize",
    "padded_batches",
    "printable",
    "stratified_split",
]
