"""Mini-batches as index tensors and slices of tensors that already sit on the training device.

Fixed shapes are the fast path: cuDNN (with benchmark mode) tunes its kernels once per input shape, and a
short last batch or a differently sized evaluation batch costs another tuning. `TrainSampler` gives every
training batch the same size without dropping images; `padded_batches` gives every evaluation batch the same
size and says how many of its rows are real.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class TrainSampler:
    """Training batches of one size, cut from a stream of random permutations of range(count).

    The stream is perm1 + perm2 + ..., cut into consecutive windows of `batch_size`: every image is seen
    exactly once per pass over the stream although each batch is full, and what one epoch leaves of a
    permutation starts the next epoch. An epoch is floor(count / batch_size) batches (at least 1), so
    epochs cost the same and an epoch's images are all distinct. A batch_size above count is clipped to count.
    Indices are drawn with `generator` on its device (place it where the images are: no host sync).
    """

    def __init__(self, count: int, batch_size: int, generator: torch.Generator) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.count = count
        self.batch_size = min(batch_size, count)
        self.batches_per_epoch = count // self.batch_size
        self.generator = generator
        self._pending = torch.empty(0, dtype=torch.int64, device=generator.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a run resumed from a checkpoint needs to draw the batches it would have drawn."""
        return {"generator": self.generator.get_state(), "pending": self._pending.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self._pending = state["pending"].to(self.generator.device)

    def epoch(self) -> Iterator[torch.Tensor]:
        """The next `batches_per_epoch` int64 index tensors of shape [batch_size]."""
        for _ in range(self.batches_per_epoch):
            if len(self._pending) < self.batch_size:
                fresh = torch.randperm(self.count, generator=self.generator, device=self.generator.device)
                self._pending = torch.cat([self._pending, fresh])
            index, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
            yield index


def eval_batch_size(count: int, cap: int) -> int:
    """The evaluation batch size for a part of `count` images: as few batches as `cap` allows, evened out.

    ceil(count / ceil(count / cap)): 1,500 validation images with cap 1,024 give 2 batches of 750 (no padding),
    8,000 test images give 8 of 1,000, 40 images give 1 of 40; padding is always under one row per batch.
    Use one size per part for the whole run, so each part has one shape.
    """
    if count < 1 or cap < 1:
        raise ValueError(f"count and cap must be at least 1, got {count} and {cap}")
    return math.ceil(count / math.ceil(count / cap))


def padded_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Yield (images, labels, n_valid) in order, every batch exactly `batch_size` rows.

    The last batch is padded by repeating the last real row; only its first n_valid rows are real, so the
    caller slices outputs with [:n_valid] (or masks) before any loss, accuracy or prediction is kept.
    Pick `batch_size` with `eval_batch_size` so padding stays small.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    count = images.shape[0]
    for start in range(0, count, batch_size):
        n_valid = min(batch_size, count - start)
        if n_valid == batch_size:
            yield images[start : start + batch_size], labels[start : start + batch_size], n_valid
        else:
            index = torch.arange(start, start + batch_size, device=images.device).clamp_(max=count - 1)
            yield images[index], labels[index.to(labels.device)], n_valid
