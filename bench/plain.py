"""The plain path both benchmarks compare against, and the setup they share.

The plain path is what a user would write without this project: PIL images, the study's torchvision
transforms applied image by image, a `torch.utils.data.DataLoader`, and the full model run on images
every batch (the frozen MobileNetV2 recomputes its backbone on every image of every epoch).

Choices, so the comparison is about the data path and the feature cache, nothing else:
- Images are an in-memory list of decoded PIL images (read once from the ImageFolder's own file list),
  not `torchvision.datasets.ImageFolder` reading files per item: JPEG decoding is a one-time cost on the
  project's path (its uint8 cache), so it is excluded from both.
- Both paths train the same images (the same stratified split, the same subset), the same model built
  with the same seed by `models.build_model`, with the same optimizer, loss and params, through the
  same loop (`search.training.train`, which calls `make_optimizer` and `make_loss`): a `PlainBatches`
  is just another batch source. On CUDA the model step is also the same (mixed precision, channels-last
  convolutions), so the ratio measures what feeds the model, not the model's numerics.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, stratified_split
from search.errors import UserError
from search.family import get_family, parse_families
from search.pipeline import DataConfig, eval_batch_cap, load_parts, place
from search.training import autocast
from search.trial import has_convolutions

# Where the benchmarks find their images and MobileNetV2 weights unless told with --data-root / --weights.
DATA_ROOT_ENV = "STL10_SEARCH_BENCH_DATA"
WEIGHTS_ENV = "STL10_SEARCH_BENCH_WEIGHTS"


# --- the plain path ---------------------------------------------------------------------------------


def plain_transforms(size: int, flip_p: float, max_rotation: float, train: bool) -> T.Compose:
    """The study's per-image transforms: Resize, (flip, rotation on train), ToTensor, Normalize."""
    augmentation = [T.RandomHorizontalFlip(flip_p), T.RandomRotation(max_rotation)] if train else []
    return T.Compose([T.Resize(size), *augmentation, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class PILImages(Dataset):
    """(PIL image, label) pairs held in memory, transformed on every access."""

    def __init__(self, samples: list[tuple[Image.Image, int]], transform: T.Compose) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.samples[index]
        return self.transform(image), label


class PlainBatches:
    """A `search.training.BatchSource` over DataLoaders: per-image transforms, host tensors copied per batch."""

    def __init__(self, pil: dict[str, list[tuple[Image.Image, int]]], size: int, params: dict[str, Any],
                 device: torch.device, seed: int, workers: int = 0) -> None:
        self.device = device
        batch_size = int(params["batch_size"])
        common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device.type == "cuda"}
        train_set = PILImages(pil["train"], plain_transforms(size, float(params["flip_p"]),
                                                             float(params["max_rotation"]), train=True))
        self.train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed), **common)
        eval_transform = plain_transforms(size, 0.0, 0.0, train=False)
        self.eval_loaders = {
            name: DataLoader(PILImages(samples, eval_transform), batch_size=eval_batch_cap(device), shuffle=False, **common)
            for name, samples in pil.items()
            if name != "train"
        }

    def num_batches(self) -> int:
        return len(self.train_loader)

    def _to_device(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._to_device(self.train_loader)

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._to_device(self.eval_loaders[part])


class TrainOnly:
    """A batch source with nothing to validate on: `train` then times the training pass alone."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def num_batches(self) -> int:
        return self.source.num_batches()

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.train_batches(epoch)

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(())


def build_plain_model(family: str, params: dict[str, Any], size: int, weights: Path | None,
                      device: torch.device, seed: int, num_classes: int) -> nn.Module:
    """The whole torch model on images, as a user would place it: channels-last only on CUDA (where the shared
    loop's settings apply to both paths); the project also uses it on the CPU, which is part of what is measured."""
    torch.manual_seed(seed)
    model = get_family(family).create_model(params, num_classes=num_classes, image_size=size,
                                            weights=str(weights) if weights else None).to(device)
    if device.type == "cuda" and has_convolutions(model):
        model = model.to(memory_format=torch.channels_last)
    return model


# --- shared setup -----------------------------------------------------------------------------------


@dataclass
class BenchData:
    """The same images for both paths: uint8 parts for the project, decoded PIL images for the plain path."""

    parts: dict[str, ImageSet]
    pil: dict[str, list[tuple[Image.Image, int]]]
    size: int
    load_seconds: float


def add_common_arguments(parser: argparse.ArgumentParser, images: int, models: str) -> None:
    parser.add_argument("--models", default=models, help=f"comma-separated families (default {models})")
    parser.add_argument("--images", type=int, default=images,
                        help=f"train images per model (default {images}); validation gets the study's 3:7 share")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="plain path DataLoader num_workers (default 0)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads for both paths (default: torch's choice, one per core); 1 gives "
                             "steady figures on a machine whose cores other work also uses")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, help="override every model's batch size (default: its reference)")
    parser.add_argument("--seed", type=int, default=0)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-root and --weights, defaulting to $STL10_SEARCH_BENCH_DATA and $STL10_SEARCH_BENCH_WEIGHTS."""
    data_root, weights = os.environ.get(DATA_ROOT_ENV), os.environ.get(WEIGHTS_ENV)
    parser.add_argument("--data-root", type=Path, default=Path(data_root) if data_root else None,
                        required=data_root is None,
                        help=f"ImageFolder dataset, DIR/train/<class>/*.jpg (default ${DATA_ROOT_ENV})")
    parser.add_argument("--weights", type=Path, default=Path(weights) if weights else None,
                        help=f"torchvision MobileNetV2 state dict (default ${WEIGHTS_ENV}, else random weights)")


def apply_threads(args: argparse.Namespace) -> int:
    """--threads, if given; returns the intra-op thread count both paths run with."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def parse_models(text: str) -> list[str]:
    """The families' own reading of --models ("all" or a list), with its message as the script's exit."""
    try:
        return parse_families(text)
    except UserError as error:
        raise SystemExit(str(error)) from None


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def image_config(args: argparse.Namespace, cache_dir: Path) -> DataConfig:
    return DataConfig(dataset="imagefolder", data_root=args.data_root, cache_dir=cache_dir,
                      weights=str(args.weights) if args.weights else "none")


def load_bench_data(args: argparse.Namespace, size: int, image_cache: Path, device: torch.device) -> BenchData:
    """`load_parts` at `size`, cut to --images train images (and 3:7 of that for validation), plus the same
    images as PIL for the plain path. The cut is a seeded random subset of each part, so classes stay mixed."""
    started = time.perf_counter()
    config = dataclasses.replace(image_config(args, image_cache), image_size=size)
    parts = load_parts(config, size)
    folder = torchvision.datasets.ImageFolder(str(Path(args.data_root) / "train"))
    labels = torch.tensor(folder.targets)
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.split_seed)
    if not torch.equal(labels[train_idx], parts["train"].labels) or not torch.equal(labels[val_idx], parts["val"].labels):
        raise SystemExit("ImageFolder order differs from the project's image order; cannot compare the same images")
    generator = torch.Generator().manual_seed(args.seed)
    counts = {"train": args.images, "val": max(1, round(args.images * 3 / 7))}
    global_index = {"train": train_idx, "val": val_idx}
    pil: dict[str, list[tuple[Image.Image, int]]] = {}
    for name, count in counts.items():
        keep = torch.randperm(len(parts[name]), generator=generator)[: min(count, len(parts[name]))].sort().values
        parts[name] = parts[name].subset(keep)
        pil[name] = [_decode(folder.samples[int(i)]) for i in global_index[name][keep]]
    return BenchData(place(parts, device), pil, size, time.perf_counter() - started)


def _decode(sample: tuple[str, int]) -> tuple[Image.Image, int]:
    path, label = sample
    with Image.open(path) as image:
        return image.convert("RGB"), label


def warm_up(family: str, params: dict[str, Any], size: int, weights: Path | None, device: torch.device) -> None:
    """One untimed forward/backward on a throwaway model, so one-off kernel setup hits neither path."""
    model = build_plain_model(family, params, size, weights, device, seed=0, num_classes=10).train()  # shapes only
    x = torch.randn(int(params["batch_size"]), 3, size, size, device=device)
    with autocast(device):
        loss = model(x).float().logsumexp(1).mean()
    if loss.requires_grad:
        loss.backward()
    clock(device)


def forget_features() -> None:
    """Empty the worker's in-memory feature cache, so the next frozen-backbone trial starts cold or reads disk."""
    from search import features

    features.MEMORY.clear()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
