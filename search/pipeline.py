"""From a data configuration to image batches on the training device: what every run of every family reads."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from data import (DataError, ImageSet, TrainSampler, augment, eval_batch_size, load_images, normalize,
                  padded_batches, stratified_split)
from search.errors import UserError

EVAL_BATCH_SIZE = 1024  # evaluation batches on a GPU: one fixed shape, padded (see fixed_eval_batches)
CPU_EVAL_BATCH_SIZE = 128  # the CPU evaluates a small CNN 2x faster in batches of 64-128 than of 1024

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


def data_identity(*images: ImageSet) -> dict[str, Any]:
    """What a study remembers of its train images (given whole or as train and validation parts): class names
    and images per class. It survives copying the data to another host, unlike file times, and tells a renamed,
    added or removed class or image."""
    labels = torch.cat([part.labels.cpu() for part in images])
    counts = torch.bincount(labels, minlength=len(images[0].classes)).tolist()
    return {"classes": list(images[0].classes), "images_per_class": counts}


def load_parts(config: DataConfig, size: int, with_test: bool = False, full_train: bool = False,
               expect: dict[str, Any] | None = None) -> dict[str, ImageSet]:
    """{"train", "val"[, "test"]} as uint8 image sets of side `size`.

    With full_train, train is train+validation; val still holds the validation images, so its curve is no
    longer a held-out measure (the test split is). With `expect` (a study's `data_identity`), train images
    that differ from it are a DataError: results on other data must not join the study's.
    """
    everything = load_images(config.dataset, config.data_root, "train", size, config.cache_dir)
    if expect is not None and data_identity(everything) != expect:
        now = data_identity(everything)
        what = (f"classes {expect['classes']} -> {now['classes']}" if now["classes"] != expect["classes"] else
                f"images per class {expect['images_per_class']} -> {now['images_per_class']}")
        raise DataError(f"the dataset {config.data_root or config.dataset} changed since the study was created "
                        f"({what}); restore it, or start new studies with --study-prefix")
    train_idx, val_idx = stratified_split(everything.labels, config.val_fraction, config.split_seed, everything.classes)
    parts = {"train": everything if full_train else everything.subset(train_idx), "val": everything.subset(val_idx)}
    if with_test:
        parts["test"] = load_images(config.dataset, config.data_root, "test", size, config.cache_dir)
        if parts["test"].classes != everything.classes:  # the folders changed between the two reads
            raise DataError(f"the test part's classes {list(parts['test'].classes)} differ from the train part's "
                            f"{list(everything.classes)}; the dataset changed while it was read, run again")
    return parts


def place(parts: dict[str, ImageSet], device: torch.device) -> dict[str, ImageSet]:
    """Images and labels on the training device when the images fit in half its free memory, else pinned in host
    memory for fast copies: training batches go through `PinnedStaging`, evaluation batches are slices of the
    pinned tensors (but for each part's padded last batch, gathered once per evaluation)."""
    if device.type != "cuda":
        return parts
    needed = sum(p.images.numel() for p in parts.values())
    free, _ = torch.cuda.mem_get_info(device)
    if needed < free // 2:
        return {name: p.to(device) for name, p in parts.items()}
    return {name: dataclasses.replace(p, images=p.images.pin_memory(), labels=p.labels.pin_memory())
            for name, p in parts.items()}


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of a run; translation and cutout are fractions of the image side."""

    flip_p: float = 0.0
    max_rotation: float = 0.0
    translate: float = 0.0
    cutout: float = 0.0

    @classmethod
    def of(cls, params: dict[str, Any]) -> Augmentation:
        return cls(*(float(params.get(name, 0.0)) for name in ("flip_p", "max_rotation", "translate", "cutout")))

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per image random draws from `generator` (on images.device), on normalized float images."""
        side = images.shape[-1]
        return augment(images, self.flip_p, self.max_rotation, generator, max_translate=round(self.translate * side),
                       cutout=round(self.cutout * side))


def eval_batch_cap(device: torch.device) -> int:
    """The largest evaluation batch on `device`."""
    return EVAL_BATCH_SIZE if device.type == "cuda" else CPU_EVAL_BATCH_SIZE


def fixed_eval_batches(part: ImageSet, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(uint8 images, labels on `device`, n_valid) batches of one shape per part; padding rows are not real."""
    size = eval_batch_size(len(part), eval_batch_cap(device))
    for x, y, n_valid in padded_batches(part.images, part.labels, size):
        yield x, y.to(device, non_blocking=True), n_valid


class PinnedStaging:
    """Training batches gathered from tensors in host memory (images and labels) into two reused sets of pinned
    buffers, each copied to the device without blocking the host.

    `images[index]` would gather into a new, pageable tensor, whose `non_blocking` copy is synchronous, and copying
    the index to the GPU to gather labels there would wait for the GPU's queued work. A set of buffers is written
    again only once its previous copies have finished (a CUDA event per set), so the host gathers the next batch
    while the last one is in flight. Off CUDA the buffers are plain memory (pinning needs a GPU).
    """

    def __init__(self, tensors: list[torch.Tensor], batch_size: int, device: torch.device) -> None:
        self.tensors, self.device = tensors, device
        pin = device.type == "cuda"
        self.buffers = [[torch.empty((batch_size, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for t in tensors]
                        for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def gather(self, index: torch.Tensor) -> list[torch.Tensor]:
        """[tensor[index] for each tensor], new tensors on the device."""
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        batch = [torch.index_select(tensor, 0, index, out=buffer).to(self.device, non_blocking=True, copy=True)
                 for tensor, buffer in zip(self.tensors, self.buffers[turn])]
        if self.device.type == "cuda":
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()
        return batch


class ImageBatches:
    """Batches of uint8 images, normalized and augmented on the device, one random draw per image.

    Every training batch has one shape and every evaluation batch of a part another (padded, its padding
    left out of the metrics): on a GPU, cuDNN tunes its kernels per input shape, so a worker tunes a shape
    once and its later trials of that batch size and image size reuse the choice.
    """

    def __init__(self, parts: dict[str, ImageSet], batch_size: int, augmentation: Augmentation,
                 device: torch.device, seed: int, channels_last: bool = False) -> None:
        self.parts = parts
        self.augmentation = augmentation
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device).manual_seed(seed)
        index_generator = torch.Generator(device=parts["train"].images.device).manual_seed(seed)
        self.sampler = TrainSampler(len(parts["train"]), batch_size, index_generator)
        train = parts["train"]
        in_host_memory = train.images.device.type == "cpu" and device.type == "cuda"
        self.staging = (PinnedStaging([train.images, train.labels], self.sampler.batch_size, device)
                        if in_host_memory else None)

    def num_batches(self) -> int:
        return self.sampler.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """The random state at an epoch boundary: a run resumed from a checkpoint draws what it would have drawn."""
        return {"generator": self.generator.get_state(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.sampler.load_state_dict(state["sampler"])

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x.to(self.device, non_blocking=True))

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = self.parts["train"]
        for index in self.sampler.epoch():
            if self.staging is not None:
                images, labels = self.staging.gather(index)
            else:
                images, labels = train.images[index], train.labels[index.to(train.labels.device)]
            x = self.augmentation.apply(self._prepare(images), self.generator)
            yield x.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True)

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for x, y, n_valid in fixed_eval_batches(self.parts[part], self.device):
            yield self._prepare(x).contiguous(memory_format=self.memory_format), y, n_valid


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


__all__ = ["STORED_DATA_FIELDS", "Augmentation", "DataConfig", "ImageBatches", "PinnedStaging", "data_identity",
           "fixed_eval_batches", "load_parts", "place", "resolve_device"]
