"""One entry point from a dataset name and folder to an ImageSet at the wanted size, with a disk cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch

from data import imagefolder, stl10
from data.errors import DATASETS, DataError, default_data_root
from data.imageset import ImageSet, fingerprint_of
from data.transforms import resize_images

PARTS = ("train", "test")
# Part of every fingerprint: bump it whenever decoding or resizing changes, so caches made by older code are rebuilt.
CACHE_VERSION = 2

_log = logging.getLogger(__name__)


def load_images(
    dataset: str, root: Path | str | None, part: str, image_size: int, cache_dir: Path | str | None = None
) -> ImageSet:
    """Decode `part` ("train" or "test") of `dataset` once, resized to image_size x image_size, as uint8.

    The set's fingerprint names its source files as they are now (ImageFolder: every file's path, size and
    modification time and the class folders; STL-10: its binary files), the part, the size and CACHE_VERSION.
    With `cache_dir`, the set is saved as one .pt file per dataset folder, part and size, and used again only
    while its fingerprint matches, so a renamed, added or changed image or class rebuilds it. A cache that
    is unreadable is rebuilt; one that cannot be written is skipped with a warning.
    """
    _check_dataset(dataset)
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    root = (Path(root).expanduser() if root is not None else default_data_root(dataset)).resolve()
    if dataset == "stl10":
        images_bin, labels_bin = stl10.stl10_files(root, part)
        if not images_bin.exists() and not labels_bin.exists():
            stl10.ensure_stl10(root)  # only when absent: present files, fixtures included, are checked by the reader
        source = stl10.stl10_fingerprint(root, part)
    else:
        listing = imagefolder.list_imagefolder(root, part)
        source = listing.fingerprint
    fingerprint = fingerprint_of(CACHE_VERSION, dataset, source, part, image_size)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(os.fsencode(root)).hexdigest()[:10]
        cache_path = Path(cache_dir).expanduser() / f"{dataset}-{key}-{part}-{image_size}.pt"
        cached = _read_cache(cache_path, fingerprint, image_size)
        if cached is not None:
            return cached
    if dataset == "stl10":
        read = stl10.read_stl10(root, part)
        read = ImageSet(resize_images(read.images, image_size), read.labels, read.classes, read.fingerprint)
    else:
        read = imagefolder.read_imagefolder(root, part, image_size, listing)
    loaded = ImageSet(read.images, read.labels, read.classes, fingerprint)
    if part == "train" and loaded.labels.unique().numel() < 2:
        raise DataError(
            f"the train part of {root} has images of only one class and a classifier needs at least 2; "
            "add images of another class"
        )
    if cache_path is not None:
        _write_cache(cache_path, loaded)
    return loaded


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def _read_cache(path: Path, fingerprint: str, image_size: int) -> ImageSet | None:
    """The cached set when it was made from the same source, else None (so it gets rebuilt); never raises."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
            _log.info("rebuilding cache file %s: made from other files or by older code", path)
            return None
        cached = ImageSet(saved["images"], saved["labels"], tuple(saved["classes"]), fingerprint)
        if cached.images.shape[-2:] != (image_size, image_size):
            raise ValueError(f"images of {tuple(cached.images.shape[-2:])}, expected {image_size}")
        if not all(isinstance(name, str) for name in cached.classes) or len(cached.classes) < 2:
            raise ValueError(f"class names {cached.classes!r}")
        if len(cached) and (cached.labels.min() < 0 or cached.labels.max() >= len(cached.classes)):
            raise ValueError("labels outside the class list")
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        _log.warning("rebuilding unreadable cache file %s (%s: %s)", path, type(error).__name__, error)
        return None
    return cached


def _write_cache(path: Path, images: ImageSet) -> None:
    """Save atomically (write then rename), so parallel workers never read a half-written file.

    A failure only costs decoding again next time, so it is a warning, and no temporary file is left behind.
    """
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    saved = {
        "images": images.images,
        "labels": images.labels,
        "classes": list(images.classes),
        "fingerprint": images.fingerprint,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, temporary)
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001 - torch.save raises RuntimeError for OS errors; the images are fine
        _log.warning(
            "cannot write image cache %s (%s: %s); the images will be decoded again next time: "
            "pass a writable --cache-dir to keep them",
            path, type(error).__name__, error,
        )
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
