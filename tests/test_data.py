"""data/: splits, augmentation, batching, the STL-10 reader and ImageFolder loading, on tiny data."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import data
from data import DataError, augment, batches, load_images, normalize, stratified_split
from data import imagefolder as imagefolder_module
from data.stl10 import IMAGE_BYTES, STL10_CLASSES, read_stl10, write_stl10_fixture


# --- splits -----------------------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_complete() -> None:
    labels = torch.arange(10).repeat_interleave(500)
    train, val = stratified_split(labels, 0.3, seed=0)
    assert (len(train), len(val)) == (3500, 1500)
    assert train.dtype == val.dtype == torch.int64
    assert torch.equal(labels[train].bincount(), torch.full((10,), 350))
    assert torch.equal(labels[val].bincount(), torch.full((10,), 150))
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(5000))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)


def test_split_depends_only_on_seed() -> None:
    labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    first, second, other = (stratified_split(labels, 0.2, seed) for seed in (7, 7, 8))
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="fraction"):
        stratified_split(torch.zeros(10, dtype=torch.int64), fraction)


# --- augment, normalize, batches --------------------------------------------------------------------


def _asymmetric_batch(count: int) -> torch.Tensor:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    return image.expand(count, 3, 16, 16).contiguous()


def test_rotation_differs_per_image_and_is_seeded() -> None:
    images = _asymmetric_batch(2)
    out = augment(images, 0.0, 30.0, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(out, augment(images, 0.0, 30.0, torch.Generator().manual_seed(0)))


def test_flip_with_p1_is_torch_flip_and_noop_returns_input() -> None:
    images = _asymmetric_batch(3)
    flipped = augment(images, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, torch.flip(images, dims=[3]))
    rotated_flip = augment(images, 1.0, 1e-9, torch.Generator().manual_seed(0))  # the grid_sample path
    assert torch.allclose(rotated_flip, torch.flip(images, dims=[3]), atol=1e-4)
    assert augment(images, 0.0, 0.0, torch.Generator()) is images


def test_normalize_maps_mean_colour_to_zero() -> None:
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-5)


def test_shuffled_batches_cover_every_index_once() -> None:
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 2, 2)
    labels = torch.arange(23)
    seen = []
    for batch_images, batch_labels in batches(images, labels, 5, True, torch.Generator().manual_seed(0)):
        assert torch.equal(batch_images[:, 0, 0, 0].long(), batch_labels)
        seen.append(batch_labels)
    assert [len(b) for b in seen] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(seen).sort().values, labels)
    assert not torch.equal(torch.cat(seen), labels)


# --- STL-10 -----------------------------------------------------------------------------------------


def test_stl10_fixture_reads_back(tmp_path: Path) -> None:
    write_stl10_fixture(tmp_path, per_class=2)
    train = load_images("stl10", tmp_path, "train", 32)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.labels, torch.arange(10).repeat_interleave(2))
    assert train.classes == STL10_CLASSES
    assert len(read_stl10(tmp_path, "test")) == 20


def test_stl10_reader_keeps_orientation(tmp_path: Path) -> None:
    """Written by hand in the official column-major layout, independent of our fixture writer."""
    image = np.zeros((3, 96, 96), dtype=np.uint8)
    image[0, :10, :] = 255  # red band along the top rows
    image[1, :, :5] = 200  # green band along the left columns
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    image.transpose(0, 2, 1).tofile(folder / "train_X.bin")
    np.array([3], dtype=np.uint8).tofile(folder / "train_y.bin")
    read = read_stl10(tmp_path, "train")
    assert torch.equal(read.images[0], torch.from_numpy(image))
    assert read.labels.tolist() == [2]


def test_truncated_stl10_file_names_file_and_size(tmp_path: Path) -> None:
    write_stl10_fixture(tmp_path, per_class=1)
    images_path = tmp_path / "stl10_binary" / "train_X.bin"
    images_path.write_bytes(images_path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"train_X.bin.*{IMAGE_BYTES} bytes"):
        load_images("stl10", tmp_path, "train", 32)


def test_missing_stl10_offline_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    with pytest.raises(DataError) as caught:
        load_images("stl10", tmp_path / "nowhere", "train", 64)
    message = str(caught.value)
    assert "train_X.bin" in message and str(5000 * IMAGE_BYTES) in message
    assert "stl10_binary.tar.gz" in message and "URLError" in message and "\n" not in message


def test_unknown_dataset_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_images("mnist", tmp_path, "train", 32)


# --- ImageFolder ------------------------------------------------------------------------------------


def _write_folder(root: Path, classes: dict[str, list[str]], count: int = 2) -> Path:
    for part, names in classes.items():
        for name in names:
            (root / part / name).mkdir(parents=True)
            for index in range(count):
                colour = (200 if name == "dog" else 0, index * 60, 30)
                size = (20, 12) if index % 2 else (16, 16)  # mixed sizes all end up image_size square
                Image.new("RGB", size, colour).save(root / part / name / f"{index}.png")
    return root


def test_imagefolder_loads_sorted_classes(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": ["dog", "cat"], "test": ["cat", "dog"]}, count=3)
    train = load_images("imagefolder", root, "train", 8)
    assert train.images.shape == (6, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == ("cat", "dog")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[3, 0].float().mean() == pytest.approx(200, abs=2)  # dogs are red


def test_imagefolder_missing_test_class_is_a_data_error(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat"]})
    with pytest.raises(DataError, match="only in train \\['dog'\\]"):
        load_images("imagefolder", root, "test", 8)


def test_imagefolder_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images("imagefolder", tmp_path / "nothing", "train", 8)


def test_cache_round_trip_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_folder(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    cache = tmp_path / "cache"
    first = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    assert len(list(cache.glob("imagefolder-*-train-8.pt"))) == 1

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imagefolder_module, "read_imagefolder", no_decoding)
    second = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = write_stl10_fixture(tmp_path / "stl", per_class=1)
    cache = tmp_path / "cache"
    first = load_images("stl10", root, "test", 16, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    cache_file.write_bytes(b"not a torch file")
    assert torch.equal(load_images("stl10", root, "test", 16, cache_dir=cache).images, first.images)


def test_imageset_subset_and_to() -> None:
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    full = data.ImageSet(images, torch.tensor([0, 1, 0, 1]), ("a", "b"))
    part = full.subset(torch.tensor([1, 3]))
    assert len(part) == 2 and part.labels.tolist() == [1, 1] and part.images.is_contiguous()
    assert part.to("cpu").classes == ("a", "b")
