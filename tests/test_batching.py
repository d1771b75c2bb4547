"""data/batching.py: one training batch shape with every image once per pass; one padded evaluation shape."""

from __future__ import annotations

import pytest
import torch

from data import TrainSampler, eval_batch_size, padded_batches


@pytest.mark.parametrize("count, batch_size", [(23, 5), (10, 3), (7, 7), (100, 64)])
def test_train_batches_keep_one_shape_and_see_every_index_once_per_pass(count: int, batch_size: int) -> None:
    sampler = TrainSampler(count, batch_size, torch.Generator().manual_seed(0))
    assert sampler.batches_per_epoch == count // batch_size
    passes = 12
    drawn = []
    while len(drawn) * batch_size < passes * count:  # whole epochs, until `passes` permutations are used up
        epoch = list(sampler.epoch())
        assert len(epoch) == sampler.batches_per_epoch
        assert {tuple(index.shape) for index in epoch} == {(batch_size,)}
        assert all(index.dtype == torch.int64 for index in epoch)
        drawn += epoch
    stream = torch.cat(drawn)
    for k in range(passes):
        one_pass = stream[k * count : (k + 1) * count]
        assert torch.equal(one_pass.sort().values, torch.arange(count)), f"pass {k} is not a permutation"
    assert torch.equal(stream[: passes * count].bincount(minlength=count), torch.full((count,), passes))


def test_leftover_of_one_epoch_starts_the_next() -> None:
    sampler = TrainSampler(10, 4, torch.Generator().manual_seed(3))
    first, second = torch.cat(list(sampler.epoch())), torch.cat(list(sampler.epoch()))
    reference = torch.Generator().manual_seed(3)
    permutations = torch.cat([torch.randperm(10, generator=reference) for _ in range(2)])
    assert torch.equal(torch.cat([first, second]), permutations[:16])


def test_train_batch_larger_than_the_set_is_clipped() -> None:
    sampler = TrainSampler(5, 64, torch.Generator().manual_seed(0))
    assert (sampler.batch_size, sampler.batches_per_epoch) == (5, 1)
    (index,) = sampler.epoch()
    assert torch.equal(index.sort().values, torch.arange(5))


def test_train_sampler_is_seeded_and_rejects_bad_sizes() -> None:
    draw = lambda seed: torch.cat(list(TrainSampler(20, 6, torch.Generator().manual_seed(seed)).epoch()))  # noqa: E731
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError):
        TrainSampler(0, 4, torch.Generator())
    with pytest.raises(ValueError):
        TrainSampler(4, 0, torch.Generator())


@pytest.mark.parametrize("count, batch_size", [(23, 5), (20, 5), (3, 8)])
def test_padded_eval_batches_cover_every_row_once_with_one_shape(count: int, batch_size: int) -> None:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 2, 2)
    labels = torch.arange(count)
    real = []
    for x, y, n_valid in padded_batches(images, labels, batch_size):
        assert x.shape == (batch_size, 3, 2, 2) and y.shape == (batch_size,)
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # padding rows are still (image, label) pairs
        real.append(y[:n_valid])
    assert [len(r) for r in real] == [min(batch_size, count - s) for s in range(0, count, batch_size)]
    assert torch.equal(torch.cat(real), labels)


def test_eval_batch_size_evens_out_batches_under_the_cap() -> None:
    assert eval_batch_size(1500, 1024) == 750
    assert eval_batch_size(8000, 1024) == 1000
    assert eval_batch_size(3500, 1024) == 875
    assert eval_batch_size(40, 1024) == 40
    assert eval_batch_size(1025, 1024) == 513
    for count in range(1, 300):
        size = eval_batch_size(count, 64)
        batches_needed = -(-count // size)
        assert size <= 64 and batches_needed == -(-count // 64) and batches_needed * size - count < batches_needed
