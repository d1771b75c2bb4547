"""Train/validation split of the official train part, stratified so every class keeps its share."""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from data.imageset import DataError, printable

MIN_IMAGES_PER_CLASS = 5  # fewer, and a class can neither be learned nor judged on validation

_log = logging.getLogger(__name__)


def stratified_split(
    labels: torch.Tensor, val_fraction: float = 0.3, seed: int = 0, classes: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, disjoint int64 (train, val) indices; each class gives round(count * val_fraction) to val.

    Deterministic for a seed, so every trial of a study is judged on the same validation images.
    5,000 STL-10 train labels (500 per class) give 3,500 / 1,500 (350 / 150 per class).
    A class with fewer than MIN_IMAGES_PER_CLASS images, or none left for train or validation, is named in a
    warning (`classes` gives the names): the split still works, but that class's accuracy means little.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts, few = [], [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
        if len(members) < MIN_IMAGES_PER_CLASS or n_val in (0, len(members)):
            name = printable(classes[int(label)]) if classes is not None else f"label {int(label)}"
            few.append(f"{name} ({len(members)}: {len(members) - n_val} train, {n_val} validation)")
    train = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.int64)
    val = torch.cat(val_parts).sort().values if val_parts else torch.empty(0, dtype=torch.int64)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"splitting {len(labels)} images with validation fraction {val_fraction} leaves "
            f"{len(train)} train and {len(val)} validation images; use more images or another fraction"
        )
    if few:
        _warn_once(f"warning: too few train images in class(es) {'; '.join(few)}: each class needs at least "
                   f"{MIN_IMAGES_PER_CLASS}, with some for both train and validation; add images to them")
    return train, val


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Once per process: the split is made again for every image size and every run."""
    _log.warning(message)
