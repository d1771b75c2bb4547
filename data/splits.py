"""Train/validation split of the official train part, stratified so every class keeps its share."""

from __future__ import annotations

import torch

from data.imageset import DataError


def stratified_split(
    labels: torch.Tensor, val_fraction: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, disjoint int64 (train, val) indices; each class gives round(count * val_fraction) to val.

    Deterministic for a seed, so every trial of a study is judged on the same validation images.
    5,000 STL-10 train labels (500 per class) give 3,500 / 1,500 (350 / 150 per class).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.int64)
    val = torch.cat(val_parts).sort().values if val_parts else torch.empty(0, dtype=torch.int64)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"splitting {len(labels)} images with validation fraction {val_fraction} leaves "
            f"{len(train)} train and {len(val)} validation images; use more images or another fraction"
        )
    return train, val
