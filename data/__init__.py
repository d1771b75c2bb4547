"""Datasets (STL-10, any ImageFolder) as in-memory uint8 tensors, splits, batches and batched augmentation.

Knows nothing of Optuna or the models. Names are loaded on first use (PEP 562), so `from data import
DataError` does not import torch: the command line answers --help without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DATASETS": "data.errors",
    "DataError": "data.errors",
    "default_data_root": "data.errors",
    "IMAGENET_MEAN": "data.transforms",
    "IMAGENET_STD": "data.transforms",
    "ImageSet": "data.imageset",
    "TrainSampler": "data.batching",
    "augment": "data.transforms",
    "augment_with": "data.transforms",
    "augmentation_examples": "data.transforms",
    "eval_batch_size": "data.batching",
    "fingerprint_of": "data.imageset",
    "load_images": "data.loading",
    "normalize": "data.transforms",
    "padded_batches": "data.batching",
    "printable": "data.imageset",
    "stratified_split": "data.splits",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
