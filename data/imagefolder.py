"""Any dataset laid out as DIR/train/<class>/<image> and DIR/test/<class>/<image>, decoded to one tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.imageset import DataError, ImageSet
from data.transforms import resize_images

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
PARTS = ("train", "test")
_DECODE_CHUNK = 512  # images held at their own size at once: batched resizing without unbounded memory
_LAYOUT = "expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg with the same class folders"


def read_imagefolder(root: Path | str, part: str, image_size: int) -> ImageSet:
    """Decode every image of `part` to RGB uint8 [3, image_size, image_size]; labels follow sorted class names.

    Both train and test class lists are checked whichever part is read, so a mismatch shows up before a
    long search rather than at the final test.
    """
    root = Path(root).expanduser()
    classes = _class_names(root)
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / part / name
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DataError(
                f"class folder {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add some, or remove the class from both train and test"
            )
        paths += found
        labels += [label] * len(found)
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, len(paths), _DECODE_CHUNK):
        decoded = [_decode(path, image_size) for path in paths[start : start + _DECODE_CHUNK]]
        images[start : start + len(decoded)] = _resize_by_shape(decoded, image_size)
    return ImageSet(images=images, labels=torch.tensor(labels, dtype=torch.int64), classes=classes)


def _class_names(root: Path) -> tuple[str, ...]:
    """Sorted class folder names, required identical in train and test."""
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
    return names["train"]


def _decode(path: Path, size: int) -> torch.Tensor:
    """One image file -> RGB uint8 [H, W, 3]; JPEG draft mode skips decoding detail that resizing would drop."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            return torch.from_numpy(np.array(image.convert("RGB")))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot decode image {path} ({error}); replace or remove the file") from error


def _resize_by_shape(pictures: list[torch.Tensor], size: int) -> torch.Tensor:
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
