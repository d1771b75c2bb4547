"""Mini-batches as slices of tensors that already sit on the training device."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches covering every index once; the last partial batch is kept.

    Shuffling draws one permutation on images.device (a `generator` must live there too), so no
    DataLoader, workers or host copies are involved.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    count = images.shape[0]
    if shuffle:
        order = torch.randperm(count, generator=generator, device=images.device)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            yield images[index], labels[index]
    else:
        for start in range(0, count, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
