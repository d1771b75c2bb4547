"""The in-memory dataset every model trains on: one uint8 tensor of images and one of labels."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from data.errors import DataError  # noqa: F401 - re-exported


def printable(text: object) -> str:
    """`text` as any UTF-8 file or terminal takes it: the one way names and paths are shown.

    A file or folder name that is not UTF-8 reaches Python with its bytes kept as surrogate escapes
    (os.fsdecode), which no UTF-8 writer accepts; those bytes are shown as \\xNN.
    """
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (from JSON, say)
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def fingerprint_of(*parts: object) -> str:
    """A short stable hash of strings, numbers, bytes and CPU tensors: the identity that caches are keyed by."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(repr((part.dtype, tuple(part.shape))).encode())
            part = part.detach().cpu().contiguous().numpy().tobytes()
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 [N, 3, H, W] plus int64 labels [N], held whole so batches are plain slices.

    uint8 keeps a whole dataset small enough to live on the GPU; `normalize` turns batches into float.
    `fingerprint` names the pixel content and labels, so caches of anything computed from the images
    (e.g. a frozen backbone's features) can be keyed by it instead of hashing the pixels. `load_images` derives
    it from the source files; a set built by hand without one gets a hash of its tensors.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint_of(self.images, self.labels, self.classes))

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at `indices` (a copy, contiguous), e.g. the train or validation part of a split.

        Its fingerprint comes from this set's and the indices, without reading any pixel.
        """
        indices = indices.to(self.images.device)
        return dataclasses.replace(
            self,
            images=self.images[indices],
            labels=self.labels[indices],
            fingerprint=fingerprint_of(self.fingerprint, indices.to(torch.int64)),
        )

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set on `device`; moving it to the GPU once makes every later batch free of copies."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))
