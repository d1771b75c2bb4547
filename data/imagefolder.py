"""Any dataset laid out as DIR/train/<class>/<image> and DIR/test/<class>/<image>, decoded to one tensor."""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.imageset import DataError, ImageSet, fingerprint_of
from data.transforms import resize_images

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
PARTS = ("train", "test")
_DECODE_CHUNK = 512  # images held at their own size at once: batched resizing without unbounded memory
_LAYOUT = "expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg with the same class folders"


@dataclass(frozen=True)
class ImageFolderListing:
    """The image files of one part, in label order, as decoding reads them.

    `fingerprint` covers the class folder names and every file's relative path, size and modification time,
    so a cache keyed by it is rebuilt when a class is renamed or added or an image changes. Listing costs one
    stat per file, not a read: about 25 ms for 5,000 files and 40 ms for 8,000 on a local disk.
    """

    root: Path
    part: str
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative to root/part, '/'-separated
    labels: tuple[int, ...]
    fingerprint: str


def list_imagefolder(root: Path | str, part: str) -> ImageFolderListing:
    """The image files of `part`; hidden files and folders (names starting with '.') are skipped.

    Both train and test class lists are checked whichever part is listed, so a mismatch shows up before a
    long search rather than at the final test.
    """
    root = Path(root).expanduser()
    classes = _class_names(root)
    per_class = []
    for name in classes:
        found = _image_files(str(root / part / name), name + "/")
        if not found:
            raise DataError(
                f"class folder {root / part / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add some, or remove the class from both train and test"
            )
        per_class.append(found)
    files = tuple(relative for found in per_class for relative, _, _ in found)
    labels = tuple(label for label, found in enumerate(per_class) for _ in found)
    fingerprint = fingerprint_of(classes, per_class)  # the repr of every (path, size, mtime)
    return ImageFolderListing(root, part, classes, files, labels, fingerprint)


def read_imagefolder(
    root: Path | str, part: str, image_size: int, listing: ImageFolderListing | None = None
) -> ImageSet:
    """Decode every image of `part` to RGB uint8 [3, image_size, image_size]; labels follow sorted class names.

    Pass the `listing` the caller already made (and keyed a cache by) so exactly those files are decoded.
    """
    listing = listing or list_imagefolder(root, part)
    paths = [listing.root / part / relative for relative in listing.files]
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, len(paths), _DECODE_CHUNK):
        decoded = [decode_image(path, image_size) for path in paths[start : start + _DECODE_CHUNK]]
        images[start : start + len(decoded)] = resize_pictures(decoded, image_size)
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    return ImageSet(images, labels, listing.classes, fingerprint_of(listing.fingerprint, image_size))


def find_images(folder: Path | str) -> list[str]:
    """The image files under `folder`, relative and '/'-separated, in the order `list_imagefolder` reads a class."""
    return [relative for relative, _, _ in _image_files(str(Path(folder).expanduser()), "")]


def _class_names(root: Path) -> tuple[str, ...]:
    """Sorted class folder names (at least 2), required identical in train and test."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {_LAYOUT}, passed with --data-root DIR")
    names = {}
    for part in PARTS:
        folder = root / part
        if not folder.is_dir():
            raise DataError(f"folder {folder} does not exist; {_LAYOUT}")
        names[part] = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not names[part]:
            raise DataError(f"folder {folder} has no class folders; {_LAYOUT}")
    if names["train"] != names["test"]:
        only_train = sorted(set(names["train"]) - set(names["test"]))
        only_test = sorted(set(names["test"]) - set(names["train"]))
        raise DataError(
            f"class folders differ between {root / 'train'} and {root / 'test'}: only in train {only_train}, "
            f"only in test {only_test}; {_LAYOUT}"
        )
    if len(names["train"]) < 2:
        raise DataError(
            f"{root} has one class folder ({names['train'][0]}) and a classifier needs at least 2; "
            f"add another class to both train and test"
        )
    return names["train"]


def _image_files(folder: str, prefix: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of the image files under `folder`, depth first in name order.

    Name order at each level is the order of sorted full paths; hidden names are skipped (macOS `._x.jpg`
    AppleDouble files are not images) and, as with Path.rglob, linked subfolders are not entered.
    """
    found = []
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=operator.attrgetter("name"))
    except OSError as error:
        raise DataError(f"cannot list folder {folder} ({error}); make it readable") from error
    for entry in entries:
        name = entry.name
        if name[0] == ".":
            continue
        if entry.is_dir(follow_symlinks=False):
            found += _image_files(entry.path, prefix + name + "/")
        elif name[name.rfind(".") :].lower() in IMAGE_EXTENSIONS and entry.is_file():
            stat = entry.stat()
            found.append((prefix + name, stat.st_size, stat.st_mtime_ns))
    return found


def decode_image(path: Path | str, size: int) -> torch.Tensor:
    """One image file -> RGB uint8 [H, W, 3]; JPEG draft mode skips decoding detail that resizing would drop.

    With `resize_pictures`, what training and `predict` both read: the same file gives the same pixels.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            return torch.from_numpy(np.array(image.convert("RGB")))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot decode image {path} ({error}); replace or remove the file") from error


def resize_pictures(pictures: list[torch.Tensor], size: int) -> torch.Tensor:
    """[H, W, 3] pictures -> uint8 [N, 3, size, size], resizing each group of equal shapes as one batch.

    One batched call is about ten times faster than one call per small image; the permuted (channels-last)
    stack is the layout torch's uint8 resize is fastest on.
    """
    resized = torch.empty(len(pictures), 3, size, size, dtype=torch.uint8)
    by_shape: dict[torch.Size, list[int]] = {}
    for index, picture in enumerate(pictures):
        by_shape.setdefault(picture.shape, []).append(index)
    for indices in by_shape.values():
        group = torch.stack([pictures[i] for i in indices]).permute(0, 3, 1, 2)
        resized[indices] = resize_images(group, size)
    return resized
