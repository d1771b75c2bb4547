"""One entry point from a dataset name and folder to an ImageSet at the wanted size, with a disk cache."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from data import imagefolder, stl10
from data.imageset import DataError, ImageSet
from data.transforms import resize_images

DATASETS = ("stl10", "imagefolder")
PARTS = ("train", "test")

_log = logging.getLogger(__name__)


def default_data_root(dataset: str) -> Path:
    """Where a dataset lives when no folder is given: $XDG_CACHE_HOME (or ~/.cache)/stl10-search/<dataset>."""
    _check_dataset(dataset)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "stl10-search" / dataset


def load_images(
    dataset: str, root: Path | str | None, part: str, image_size: int, cache_dir: Path | str | None = None
) -> ImageSet:
    """Decode `part` ("train" or "test") of `dataset` once, resized to image_size x image_size, as uint8.

    With `cache_dir`, the result is saved as one .pt file keyed by dataset, resolved root, part and size, and
    later calls load it instead of decoding; a corrupt cache file is rebuilt. The cache is not invalidated
    when the images change: delete it then.
    """
    _check_dataset(dataset)
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    root = (Path(root).expanduser() if root is not None else default_data_root(dataset)).resolve()
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(str(root).encode()).hexdigest()[:10]
        cache_path = Path(cache_dir).expanduser() / f"{dataset}-{key}-{part}-{image_size}.pt"
        cached = _read_cache(cache_path, image_size)
        if cached is not None:
            return cached
    if dataset == "stl10":
        images_bin, labels_bin = stl10.stl10_files(root, part)
        if not images_bin.exists() and not labels_bin.exists():
            stl10.ensure_stl10(root)  # only when absent: present files, fixtures included, are checked by the reader
        loaded = stl10.read_stl10(root, part)
        loaded = ImageSet(resize_images(loaded.images, image_size), loaded.labels, loaded.classes)
    else:
        loaded = imagefolder.read_imagefolder(root, part, image_size)
    if cache_path is not None:
        _write_cache(cache_path, loaded)
    return loaded


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def _read_cache(path: Path, image_size: int) -> ImageSet | None:
    """The cached set, or None when missing or unreadable (so it gets rebuilt)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cached = ImageSet(images=saved["images"], labels=saved["labels"], classes=tuple(saved["classes"]))
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        _log.warning("rebuilding unreadable cache file %s (%s)", path, error)
        return None
    if cached.images.shape[-2:] != (image_size, image_size):
        _log.warning("rebuilding cache file %s with wrong image size", path)
        return None
    return cached


def _write_cache(path: Path, images: ImageSet) -> None:
    """Save atomically (write then rename), so parallel workers never read a half-written file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images.images, "labels": images.labels, "classes": list(images.classes)}, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"cannot write cache file {path} ({error}); pass a writable cache folder") from error
