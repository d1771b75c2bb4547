"""data/: splits, augmentation, batching, the STL-10 reader and ImageFolder loading, on tiny data."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import data
from data import DataError, augment, augment_with, augmentation_examples, load_images, normalize, stratified_split
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


# --- augment, normalize -----------------------------------------------------------------------------


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


def _old_augment(images: torch.Tensor, flip_p: float, max_rotation: float, generator: torch.Generator) -> torch.Tensor:
    """augment as it was before translation and cutout: affine_grid + grid_sample."""
    batch = images.shape[0]
    flip = torch.rand(batch, generator=generator) < flip_p
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(max_rotation)
    sign = 1.0 - 2.0 * flip.float()
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(batch)
    theta = torch.stack([torch.stack([cos * sign, -sin, zero], 1), torch.stack([sin * sign, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def test_flip_and_rotation_alone_give_what_they_gave_before() -> None:
    images = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    new = augment(images, 0.5, 8.0, torch.Generator().manual_seed(5))
    assert torch.allclose(new, _old_augment(images, 0.5, 8.0, torch.Generator().manual_seed(5)), atol=1e-5)


def _shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Pad-and-crop by hand: content moves dx right and dy down, zeros come in."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    return out


def test_translation_moves_whole_pixels_in_both_paths() -> None:
    images = _asymmetric_batch(4) + 1  # no zeros of its own
    shift = torch.tensor([[2, -1], [-3, 0], [0, 3], [1, 1]])
    flip = torch.tensor([False, True, False, True])
    exact = augment_with(images, flip=flip, shift=shift)
    resampled = augment_with(images, flip=flip, shift=shift, degrees=torch.zeros(4))  # the grid_sample path
    for image, out, (dx, dy), flipped in zip(images, exact, shift.tolist(), flip.tolist()):
        assert torch.equal(out, _shifted(image.flip(-1) if flipped else image, dx, dy))
    assert torch.allclose(resampled, exact, atol=1e-4)


def test_random_translation_is_a_whole_pixel_shift_within_the_limit() -> None:
    images = _asymmetric_batch(8) + 1
    out = augment(images, 0.0, 0.0, torch.Generator().manual_seed(2), max_translate=2)
    shifts = []
    for image, moved in zip(images, out):
        candidates = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)]
        (found,) = [shift for shift in candidates if torch.equal(moved, _shifted(image, *shift))]
        shifts.append(found)
    assert len(set(shifts)) > 1


def test_cutout_zeroes_one_square_per_image_inside_it() -> None:
    images = _asymmetric_batch(6) + 1
    out = augment(images, 0.0, 0.0, torch.Generator().manual_seed(0), cutout=5)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel of the same pixels
    corners = set()
    for mask in zero[:, 0]:
        rows, columns = mask.nonzero().unbind(1)
        assert mask.sum() == 25 and rows.max() - rows.min() == 4 and columns.max() - columns.min() == 4
        corners.add((int(rows.min()), int(columns.min())))
    assert len(corners) > 1
    assert torch.equal(out[~zero], images[~zero])
    assert torch.equal(augment(images, 0.0, 0.0, torch.Generator(), cutout=99), torch.zeros_like(images))


def test_augment_keeps_channels_last() -> None:
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    channels_last = images.contiguous(memory_format=torch.channels_last)
    for settings in [(0.5, 8.0, 0, 0), (0.5, 0.0, 2, 0), (0.5, 8.0, 2, 3), (0.0, 0.0, 0, 3)]:
        flip_p, rotation, translate, cutout = settings
        out = augment(channels_last, flip_p, rotation, torch.Generator().manual_seed(1), translate, cutout)
        assert out.is_contiguous(memory_format=torch.channels_last), settings
        same = augment(images, flip_p, rotation, torch.Generator().manual_seed(1), translate, cutout)
        assert torch.allclose(out, same, atol=1e-6), settings


def test_augmentation_examples_show_each_lever_alone() -> None:
    image = _asymmetric_batch(1)[0] + 1
    examples = augmentation_examples(image, max_rotation=8.0, max_translate=3, cutout=4)
    assert list(examples) == ["flipped", "rotated", "translated", "cut out"]
    assert torch.equal(examples["flipped"], image.flip(-1))
    assert torch.equal(examples["translated"], _shifted(image, 3, 3))
    assert int((examples["cut out"] == 0).sum()) == 3 * 16 and examples["cut out"][:, 6:10, 6:10].eq(0).all()
    assert not torch.allclose(examples["rotated"], image)
    assert list(augmentation_examples(image)) == ["flipped"]


def test_normalize_maps_mean_colour_to_zero() -> None:
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-5)


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


def test_imagefolder_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": ["a", "b"], "test": ["a", "b"]})
    (root / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (root / "train" / "a" / ".DS_Store").write_bytes(b"Bud1")
    (root / "train" / "a" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / ".thumbs" / "0.png")
    (root / "train" / ".Trashes").mkdir()
    train = load_images("imagefolder", root, "train", 8)
    assert len(train) == 4 and train.classes == ("a", "b")


def test_imagefolder_with_one_class_is_a_data_error(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": ["cat"], "test": ["cat"]})
    with pytest.raises(DataError, match="at least 2"):
        load_images("imagefolder", root, "train", 8)


def test_stl10_train_with_one_label_is_a_data_error(tmp_path: Path) -> None:
    write_stl10_fixture(tmp_path, per_class=1)
    np.full(10, 4, dtype=np.uint8).tofile(tmp_path / "stl10_binary" / "train_y.bin")
    with pytest.raises(DataError, match="only one class"):
        load_images("stl10", tmp_path, "train", 16)


# --- the image cache --------------------------------------------------------------------------------


def _colour(name: str) -> int:
    return sum(map(ord, name)) * 37 % 200 + 20


def _write_class(root: Path, part: str, name: str, count: int = 2) -> None:
    """`count` pictures of one flat colour that names the class, so a label can be checked against its pixels."""
    (root / part / name).mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (12, 12), (_colour(name), 0, 0)).save(root / part / name / f"{index}.png")


def _assert_labels_match_pixels(images: data.ImageSet) -> None:
    red = images.images[:, 0].float().mean((1, 2))
    expected = torch.tensor([float(_colour(images.classes[label])) for label in images.labels.tolist()])
    assert torch.allclose(red, expected, atol=2), "labels do not match the images' classes"


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
    assert first.fingerprint == second.fingerprint != ""


def test_fingerprint_names_source_part_and_size(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    train8 = load_images("imagefolder", root, "train", 8)
    assert load_images("imagefolder", root, "train", 8).fingerprint == train8.fingerprint
    assert load_images("imagefolder", root, "train", 16).fingerprint != train8.fingerprint
    assert load_images("imagefolder", root, "test", 8).fingerprint != train8.fingerprint
    stl = write_stl10_fixture(tmp_path / "stl", per_class=1)
    stl_train = load_images("stl10", stl, "train", 16)
    assert stl_train.fingerprint == load_images("stl10", stl, "train", 16).fingerprint
    assert stl_train.fingerprint != load_images("stl10", stl, "test", 16).fingerprint


def test_changed_image_rebuilds_cache(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for part in ("train", "test"):
        _write_class(root, part, "a")
        _write_class(root, part, "b")
    cache = tmp_path / "cache"
    before = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    Image.new("RGB", (12, 12), (0, 255, 0)).save(root / "train" / "a" / "0.png")
    after = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    assert after.fingerprint != before.fingerprint
    assert after.images[0, 1].float().mean() == pytest.approx(255, abs=1)  # the new green picture


@pytest.mark.parametrize("renamed_in", [("train", "test"), ("train",)])
def test_renamed_class_after_cache_never_misaligns_labels(tmp_path: Path, renamed_in: tuple[str, ...]) -> None:
    """Renamed in both parts: both are read anew with the new names. In train only: a DataError."""
    root = tmp_path / "images"
    for part in ("train", "test"):
        for name in ("bird", "cat"):
            _write_class(root, part, name)
    cache = tmp_path / "cache"
    load_images("imagefolder", root, "train", 8, cache_dir=cache)
    for part in renamed_in:
        (root / part / "bird").rename(root / part / "zebra")
        for picture in (root / part / "zebra").iterdir():  # repainted, as a real relabelling would change images
            Image.new("RGB", (12, 12), (_colour("zebra"), 0, 0)).save(picture)
    if renamed_in == ("train",):
        with pytest.raises(DataError, match="class folders differ"):
            load_images("imagefolder", root, "train", 8, cache_dir=cache)
        return
    train = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    test = load_images("imagefolder", root, "test", 8, cache_dir=cache)
    assert train.classes == test.classes == ("cat", "zebra")
    _assert_labels_match_pixels(train)
    _assert_labels_match_pixels(test)


def test_added_class_after_cache_is_picked_up(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for part in ("train", "test"):
        for name in ("bird", "dog"):
            _write_class(root, part, name)
    cache = tmp_path / "cache"
    assert len(load_images("imagefolder", root, "train", 8, cache_dir=cache).classes) == 2
    for part in ("train", "test"):
        _write_class(root, part, "cat")
    train = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    test = load_images("imagefolder", root, "test", 8, cache_dir=cache)
    assert train.classes == test.classes == ("bird", "cat", "dog")
    assert int(train.labels.max()) == 2
    _assert_labels_match_pixels(train)
    _assert_labels_match_pixels(test)


def _garbage_bytes(path: Path, saved: dict) -> None:
    path.write_bytes(b"not a torch file")


def _other_object(path: Path, saved: dict) -> None:
    torch.save([1, 2, 3], path)


def _missing_key(path: Path, saved: dict) -> None:
    del saved["labels"]
    torch.save(saved, path)


def _wrong_shapes(path: Path, saved: dict) -> None:
    saved["images"] = saved["images"][:, :, :4]
    torch.save(saved, path)


def _labels_out_of_range(path: Path, saved: dict) -> None:
    saved["labels"] = saved["labels"] + 10
    torch.save(saved, path)


def _fewer_labels(path: Path, saved: dict) -> None:
    saved["labels"] = saved["labels"][1:]
    torch.save(saved, path)


@pytest.mark.parametrize(
    "spoil", [_garbage_bytes, _other_object, _missing_key, _wrong_shapes, _labels_out_of_range, _fewer_labels]
)
def test_corrupt_cache_is_rebuilt(tmp_path: Path, spoil) -> None:
    root = write_stl10_fixture(tmp_path / "stl", per_class=1)
    cache = tmp_path / "cache"
    first = load_images("stl10", root, "test", 16, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    spoil(cache_file, torch.load(cache_file, weights_only=True))
    again = load_images("stl10", root, "test", 16, cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert torch.load(cache_file, weights_only=True)["fingerprint"] == first.fingerprint  # written anew


def test_cache_without_fingerprint_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache file from before fingerprints (same name, no key) may hold other classes: it is decoded again."""
    root = _write_folder(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    cache = tmp_path / "cache"
    fresh = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    torch.save({"images": fresh.images, "labels": 1 - fresh.labels, "classes": ["x", "y"]}, cache_file)
    decoded = []
    read = imagefolder_module.read_imagefolder
    monkeypatch.setattr(imagefolder_module, "read_imagefolder", lambda *a: decoded.append(1) or read(*a))
    again = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    assert decoded and again.classes == ("a", "b") and torch.equal(again.labels, fresh.labels)


def _writes_are_refused(folder: Path) -> bool:
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


def _half_write_then_fail(obj: object, path: object, *args: object, **kwargs: object) -> None:
    Path(str(path)).write_bytes(b"half a file")
    raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")  # what a full disk gives


@pytest.mark.parametrize("how", ["parent is a file", "torch.save fails", "read-only folder"])
def test_unwritable_cache_warns_and_returns_the_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    root = _write_folder(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    cache = tmp_path / "cache"
    if how == "parent is a file":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    elif how == "torch.save fails":
        monkeypatch.setattr(torch, "save", _half_write_then_fail)
    else:
        cache.mkdir()
        cache.chmod(0o500)
        if not _writes_are_refused(cache):
            cache.chmod(0o700)
            pytest.skip("running as root: a read-only folder is still writable (the other cases cover it)")
    try:
        loaded = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    finally:
        if cache.is_dir():
            cache.chmod(0o700)
    assert len(loaded) == 4 and loaded.classes == ("a", "b")
    assert "pass a writable --cache-dir to keep them" in caplog.text and str(cache) in caplog.text
    assert (list(cache.iterdir()) if cache.is_dir() else []) == []  # no temporary file left behind


def test_read_only_cache_with_a_valid_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_folder(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    cache = tmp_path / "cache"
    first = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    cache.chmod(0o500)

    def no_writing(*args: object, **kwargs: object) -> None:
        raise AssertionError("wrote or decoded although the cache was valid")

    monkeypatch.setattr(torch, "save", no_writing)
    monkeypatch.setattr(imagefolder_module, "read_imagefolder", no_writing)
    try:
        again = load_images("imagefolder", root, "train", 8, cache_dir=cache)
    finally:
        cache.chmod(0o700)
    assert torch.equal(again.images, first.images) and again.fingerprint == first.fingerprint


def test_imageset_subset_and_to() -> None:
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    full = data.ImageSet(images, torch.tensor([0, 1, 0, 1]), ("a", "b"))
    part = full.subset(torch.tensor([1, 3]))
    assert len(part) == 2 and part.labels.tolist() == [1, 1] and part.images.is_contiguous()
    assert part.to("cpu").classes == ("a", "b")


def test_subset_fingerprint_comes_from_parent_and_indices() -> None:
    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    full = data.ImageSet(images, torch.tensor([0, 1, 0, 1, 0, 1]), ("a", "b"), fingerprint="source")
    first = full.subset(torch.tensor([0, 2]))
    assert first.fingerprint == full.subset(torch.tensor([0, 2])).fingerprint
    assert first.fingerprint not in (full.fingerprint, full.subset(torch.tensor([0, 3])).fingerprint)
    assert first.to("cpu").fingerprint == first.fingerprint
    other_source = data.ImageSet(images, full.labels, ("a", "b"), fingerprint="another source")
    assert other_source.subset(torch.tensor([0, 2])).fingerprint != first.fingerprint


def test_imageset_made_by_hand_is_fingerprinted_by_content() -> None:
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    same = data.ImageSet(images.clone(), labels.clone(), ("a", "b"))
    assert data.ImageSet(images, labels, ("a", "b")).fingerprint == same.fingerprint
    assert data.ImageSet(images, 1 - labels, ("a", "b")).fingerprint != same.fingerprint
    assert data.ImageSet(images, labels, ("a", "c")).fingerprint != same.fingerprint
