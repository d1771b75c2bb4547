"""From a data configuration and a params dict to a trained model: the path shared by `train`, trials and `best`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from data import ImageSet, augment, batches, load_images, normalize, stratified_split
from models import MobileNetClassifier, build_model, get_family
from search.errors import UserError
from search.features import FeatureBatches
from search.training import EVAL_BATCH_SIZE, BatchSource, EpochMetrics, Evaluation, evaluate, make_loss, train


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stl10-search"


@dataclass(frozen=True)
class DataConfig:
    """Which images, at which size, split how. The test part is loaded only when asked for."""

    dataset: str = "stl10"
    data_root: Path | None = None
    val_fraction: float = 0.3
    split_seed: int = 0
    image_size: int | None = None  # None: the model family's own input size
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    weights: str | None = "imagenet"  # MobileNetV2 only: "imagenet", a state-dict path, or "none"

    def size_for(self, family: str) -> int:
        return self.image_size or get_family(family).image_size

    def weights_for(self, family: str) -> str | None:
        return self.weights if get_family(family).pretrained else None


def load_parts(config: DataConfig, family: str, with_test: bool = False, full_train: bool = False) -> dict[str, ImageSet]:
    """{"train", "val"[, "test"]} as uint8 image sets.

    With full_train, train is train+validation; val still holds the validation images, so its curve is no
    longer a held-out measure (the test split is).
    """
    size = config.size_for(family)
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

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = self.parts["train"]
        for x, y in batches(train.images, train.labels, self.batch_size, shuffle=True, generator=self.index_generator):
            yield augment(self._prepare(x), self.flip_p, self.max_rotation, self.generator), y.to(self.device)

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = self.parts[part]
        for x, y in batches(images.images, images.labels, EVAL_BATCH_SIZE, shuffle=False):
            yield self._prepare(x), y.to(self.device)


@dataclass
class Fit:
    """A trained model, the module the loop trained (the head alone on cached features), and its batches."""

    model: nn.Module
    trained: nn.Module
    source: BatchSource
    history: list[EpochMetrics]
    params: dict[str, Any]

    def evaluate(self, part: str, device: torch.device) -> Evaluation:
        return evaluate(self.trained, self.source.eval_batches(part), make_loss(self.params), device)


def uses_feature_cache(model: nn.Module) -> bool:
    return isinstance(model, MobileNetClassifier) and model.frozen


def prepare(
    family: str,
    params: dict[str, Any],
    parts: dict[str, ImageSet],
    config: DataConfig,
    device: torch.device,
    seed: int,
) -> tuple[nn.Module, nn.Module, BatchSource]:
    """Build the model (seeded) and its batch source: (model, module to train, source)."""
    torch.manual_seed(seed)
    num_classes = len(parts["train"].classes)
    model = build_model(family, params, num_classes=num_classes, image_size=config.size_for(family),
                        weights=config.weights_for(family)).to(device)
    # channels-last: faster convolutions on GPUs, and on the CPU 2x (inference) to 7x (training) for
    # MobileNetV2's depthwise convolutions
    conv = family not in ("logreg", "mlp")
    if conv:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes repeat every batch: pick the fastest kernels once
    if uses_feature_cache(model):
        source = FeatureBatches(model.backbone, parts, int(params["batch_size"]), int(params["feature_views"]),
                                float(params["flip_p"]), float(params["max_rotation"]), device, seed, config.cache_dir)
        return model, model.head, source
    source = ImageBatches(parts, int(params["batch_size"]), float(params["flip_p"]), float(params["max_rotation"]),
                          device, seed, channels_last=conv)
    return model, model, source


def fit(
    family: str,
    params: dict[str, Any],
    parts: dict[str, ImageSet],
    config: DataConfig,
    device: torch.device,
    seed: int = 0,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> Fit:
    """Train `family` with `params` on parts["train"], validating on parts["val"] after every epoch."""
    model, trained, source = prepare(family, params, parts, config, device, seed)
    history = train(trained, source, params, device, on_epoch=on_epoch, on_batch=on_batch)
    return Fit(model, trained, source, history, params)


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


__all__ = ["DataConfig", "Fit", "ImageBatches", "fit", "load_parts", "place", "prepare", "resolve_device"]
