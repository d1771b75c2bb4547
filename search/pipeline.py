"""From a data configuration to image batches on the training device: what every run of every family reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from data import ImageSet, augment, batches, load_images, normalize, stratified_split
from search.errors import UserError
from search.training import EVAL_BATCH_SIZE

# The DataConfig fields a study stores: every worker on every host reads the same images, split the same way.
STORED_DATA_FIELDS = ("dataset", "data_root", "val_fraction", "split_seed", "image_size", "weights")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stl10-search"


@dataclass(frozen=True)
class DataConfig:
    """Which images, at which size, split how. The test part is loaded only when asked for."""

    dataset: str = "stl10"
    data_root: Path | None = None
    val_fraction: float = 0.3
    split_seed: int = 0
    image_size: int | None = None  # None: the model family's own input size (or the trial's searched one)
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    weights: str | None = "imagenet"  # pretrained families only: "imagenet", a state-dict path, or "none"


def load_parts(config: DataConfig, size: int, with_test: bool = False, full_train: bool = False) -> dict[str, ImageSet]:
    """{"train", "val"[, "test"]} as uint8 image sets of side `size`.

    With full_train, train is train+validation; val still holds the validation images, so its curve is no
    longer a held-out measure (the test split is).
    """
    everything = load_images(config.dataset, config.data_root, "train", size, config.cache_dir)
    train_idx, val_idx = stratified_split(everything.labels, config.val_fraction, config.split_seed)
    parts = {"train": everything if full_train else everything.subset(train_idx), "val": everything.subset(val_idx)}
    if with_test:
        parts["test"] = load_images(config.dataset, config.data_root, "test", size, config.cache_dir)
    return parts


def place(parts: dict[str, ImageSet], device: torch.device) -> dict[str, ImageSet]:
    """Images on the training device when they fit in half its free memory, else pinned for fast copies."""
    if device.type != "cuda":
        return parts
    needed = sum(p.images.numel() for p in parts.values())
    free, _ = torch.cuda.mem_get_info(device)
    if needed < free // 2:
        return {name: p.to(device) for name, p in parts.items()}
    return {name: ImageSet(p.images.pin_memory(), p.labels.to(device), p.classes) for name, p in parts.items()}


class ImageBatches:
    """Batches of uint8 images, normalized and augmented on the device, one random draw per image."""

    def __init__(self, parts: dict[str, ImageSet], batch_size: int, flip_p: float, max_rotation: float,
                 device: torch.device, seed: int, channels_last: bool = False) -> None:
        self.parts = parts
        self.batch_size = batch_size
        self.flip_p, self.max_rotation = flip_p, max_rotation
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.index_generator = torch.Generator(device=parts["train"].images.device).manual_seed(seed)

    def num_batches(self) -> int:
        return -(-len(self.parts["train"]) // self.batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random state at an epoch boundary: a run resumed from a checkpoint draws what it would have drawn."""
        return {"generator": self.generator.get_state(), "index_generator": self.index_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.index_generator.set_state(state["index_generator"].cpu())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = self.parts["train"]
        for x, y in batches(train.images, train.labels, self.batch_size, shuffle=True, generator=self.index_generator):
            x = augment(self._prepare(x), self.flip_p, self.max_rotation, self.generator)
            yield x.contiguous(memory_format=self.memory_format), y.to(self.device)  # grid_sample returns NCHW

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = self.parts[part]
        for x, y in batches(images.images, images.labels, EVAL_BATCH_SIZE, shuffle=False):
            yield self._prepare(x), y.to(self.device)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


__all__ = ["STORED_DATA_FIELDS", "DataConfig", "ImageBatches", "load_parts", "place", "resolve_device"]
