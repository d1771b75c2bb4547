"""STL-10 in its official binary layout: check, download, read, and write small fixtures for tests.

Layout under a root folder: stl10_binary/{train,test}_{X,y}.bin and class_names.txt. X holds uint8
images of 3 x 96 x 96, each channel stored column-major; y holds uint8 labels 1..10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.datasets

from data.imageset import DataError, ImageSet, fingerprint_of

STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_CLASSES: tuple[str, ...] = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)  # fmt: skip
IMAGE_SIZE = 96
IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE
OFFICIAL_COUNTS = {"train": 5000, "test": 8000}


def stl10_files(root: Path | str, part: str) -> tuple[Path, Path]:
    """Paths of the (images, labels) files of `part` ("train" or "test") under `root`."""
    folder = Path(root) / "stl10_binary"
    return folder / f"{part}_X.bin", folder / f"{part}_y.bin"


def stl10_fingerprint(root: Path | str, part: str) -> str:
    """Identity of `part`'s files without reading them: size and modification time of X and y, and the class names.

    A missing file counts as a state of its own, so a cache made before it went missing is not used.
    """
    states: list[object] = []
    for path in stl10_files(root, part):
        try:
            stat = path.stat()
            states.append((path.name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            states.append((path.name, None))
    return fingerprint_of(*states, _read_class_names(Path(root) / "stl10_binary"))


def _expected_sizes() -> dict[Path, int]:
    """Byte size of every official file, relative to the root."""
    sizes = {}
    for part, count in OFFICIAL_COUNTS.items():
        images, labels = stl10_files("", part)
        sizes[images], sizes[labels] = count * IMAGE_BYTES, count
    return sizes


def _first_bad_file(root: Path) -> tuple[Path, int, int | None] | None:
    """(file, expected bytes, found bytes or None if missing) of the first file that is not official; None if all are."""
    for relative, expected in _expected_sizes().items():
        path = root / relative
        found = path.stat().st_size if path.is_file() else None
        if found != expected:
            return path, expected, found
    return None


def ensure_stl10(root: Path | str) -> None:
    """Make sure the official STL-10 binaries are in `root`, downloading them (MD5-checked by torchvision) if not.

    Any failure (offline, bad checksum, truncated file) becomes a DataError that names the file, its expected
    size and the ways to fix it, never a traceback.
    """
    root = Path(root).expanduser()
    if _first_bad_file(root) is None:
        return
    try:
        torchvision.datasets.STL10(str(root), split="train", download=True)
        reason = "the download did not produce it"
    except Exception as error:  # noqa: BLE001 - any download failure must reach the user as one line
        reason = f"downloading it failed ({type(error).__name__}: {' '.join(str(error).split())})"
    bad = _first_bad_file(root)
    if bad is None:
        return
    path, expected, found = bad
    state = "missing" if found is None else f"{found} bytes"
    raise DataError(
        f"STL-10 file {path} is {state} (expected {expected} bytes) and {reason}. Fix: connect to the internet "
        f"and run again, or download {STL10_URL} and extract it into {root}, "
        f"or use --dataset imagefolder --data-root DIR"
    )


def read_stl10(root: Path | str, part: str) -> ImageSet:
    """Read `part` of an STL-10 binary folder at 96 x 96, for any image count (real data or a test fixture).

    Only consistency is checked here (X a whole number of images, y one byte per image, labels in range);
    the official counts are enforced by `ensure_stl10`, which is what lets small fixtures load without a download.
    """
    images_path, labels_path = stl10_files(root, part)
    fix = f"delete {images_path.parent} to download it again, or extract {STL10_URL} into {Path(root)}"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise DataError(f"STL-10 file {path} is missing; {fix}")
    images_bytes = images_path.stat().st_size
    if images_bytes == 0 or images_bytes % IMAGE_BYTES:
        raise DataError(
            f"STL-10 file {images_path} has {images_bytes} bytes, expected a positive multiple of "
            f"{IMAGE_BYTES} bytes (3 x 96 x 96 per image; {OFFICIAL_COUNTS[part] * IMAGE_BYTES} bytes "
            f"for the official {part} part); {fix}"
        )
    count = images_bytes // IMAGE_BYTES
    labels_bytes = labels_path.stat().st_size
    if labels_bytes != count:
        raise DataError(
            f"STL-10 file {labels_path} has {labels_bytes} bytes, expected {count} bytes "
            f"(one per image in {images_path.name}); {fix}"
        )
    classes = _read_class_names(images_path.parent)
    raw = np.fromfile(images_path, dtype=np.uint8).reshape(count, 3, IMAGE_SIZE, IMAGE_SIZE)
    images = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))  # column-major -> rows
    labels = torch.from_numpy(np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)) - 1
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(
            f"STL-10 file {labels_path} has labels outside 1..{len(classes)} "
            f"(found {int(labels.min()) + 1}..{int(labels.max()) + 1}); {fix}"
        )
    return ImageSet(images=images, labels=labels, classes=classes, fingerprint=stl10_fingerprint(root, part))


def _read_class_names(folder: Path) -> tuple[str, ...]:
    """Names from class_names.txt when present, else the ten official names."""
    path = folder / "class_names.txt"
    if not path.is_file():
        return STL10_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return names or STL10_CLASSES


def write_stl10_fixture(root: Path | str, per_class: int = 4, seed: int = 0) -> Path:
    """Write a tiny STL-10 folder (train and test, `per_class` images per class) in the official layout.

    Each class has its own colour and stripe direction plus noise, so a model can learn it; returns `root`.
    """
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    for part in ("train", "test"):
        labels = torch.arange(len(STL10_CLASSES)).repeat_interleave(per_class)
        images = torch.empty(len(labels), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for index, label in enumerate(labels.tolist()):
            angle = torch.tensor(label * torch.pi / len(STL10_CLASSES))
            stripes = torch.sin((coords[:, None] * torch.cos(angle) + coords[None, :] * torch.sin(angle)) / 4)
            colour = torch.tensor([(label * 3 + c * 7) % 10 for c in range(3)], dtype=torch.float32) * 25
            noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 20
            images[index] = (colour.view(3, 1, 1) + 50 * stripes + noise).clamp(0, 255).to(torch.uint8)
        _write_stl10_part(root, part, images, labels)
    (root / "stl10_binary" / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return root


def _write_stl10_part(root: Path, part: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write uint8 [N, 3, 96, 96] images (row-major) and 0-based labels in the binary layout."""
    images_path, labels_path = stl10_files(root, part)
    images_path.parent.mkdir(parents=True, exist_ok=True)
    images.transpose(2, 3).contiguous().numpy().tofile(images_path)
    (labels + 1).to(torch.uint8).numpy().tofile(labels_path)
