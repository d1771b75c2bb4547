"""A frozen backbone's features, computed once and reused by every trial that trains a head on them.

Features are keyed by what made them: the images (their fingerprint), the backbone's weights, the
augmentation view, the code version and the numerics (device type and precision). They are kept in memory
for the worker's life, up to a share of the device's memory (`FeatureMemory`), and on disk across processes.
Augmentation stays meaningful: a fixed number of augmented views of the training images is cached and each
epoch draws one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock
from torch import nn
from tqdm import tqdm

from data import ImageSet, TrainSampler, eval_batch_size, fingerprint_of, normalize, padded_batches
from search.pipeline import EVAL_BATCH_SIZE, Augmentation
from search.training import autocast, numerics

FEATURES_VERSION = 2  # bump when computing features changes (preprocessing, augmentation, precision)
VIEW_SEED_BASE = 10_000  # views are shared by all trials, so their randomness must not depend on a trial's seed
FEATURE_BATCH_SIZE = {"cuda": 512, "cpu": 128}  # by device type; the CPU measured below
MEMORY_SHARE = 0.1  # of the device's memory (a GPU's, or the host's RAM for the CPU) that cached features may hold
_log = logging.getLogger(__name__)


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: a GPU's total, or the host's physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class FeatureMemory:
    """A worker's in-memory features: the least recently used go first once they pass `capacity` bytes.

    The default capacity is MEMORY_SHARE of the memory of the device the first features are on (the worker's
    training device). A view of 3,500 images is 18 MB, so a tenth of a 16 GB GPU holds about 90; beyond that a
    trial reads its features from the disk cache. Features larger than the whole capacity are not kept.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(features.nbytes for features in self._entries.values())

    def get(self, key: str) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        if self.capacity is None:
            self.capacity = int(MEMORY_SHARE * device_memory(features.device))
        if features.nbytes > self.capacity:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while self.nbytes > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (benchmarks start cold with it; the disk cache stays)."""
        self._entries.clear()


MEMORY = FeatureMemory()  # this process's


def weights_digest(module: nn.Module) -> str:
    """The identity of a module's weights (and batch-norm statistics)."""
    return fingerprint_of(*(item for name, tensor in module.state_dict().items() for item in (name, tensor.float())))


def feature_batch_size(device: torch.device) -> int:
    """Images per backbone pass: 512 on a GPU; 128 on the CPU, where MobileNetV2 at 96 px ran at 93 images/s in
    batches of 128 against 81 in batches of 256 or 512 (2 threads, the same 1,024 images, interleaved)."""
    return FEATURE_BATCH_SIZE.get(device.type, FEATURE_BATCH_SIZE["cpu"])


@torch.inference_mode()
def compute_features(
    backbone: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    augmentation: Augmentation | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Backbone outputs of uint8 images (optionally one augmented view of them), float32 [N, F] on `device`.

    Batches have one shape (the last one padded), so cuDNN tunes its kernels once.
    """
    backbone.eval()
    outputs = []
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    size = eval_batch_size(len(images), feature_batch_size(device))
    progress = tqdm(padded_batches(images, labels, size), total=-(-len(images) // size), unit="batch",
                    desc="backbone features (computed once)", leave=False, disable=None, file=sys.stderr)
    for x, _, n_valid in progress:
        x = normalize(x.to(device, non_blocking=True))
        if augmentation is not None:
            x = augmentation.apply(x, generator)
        with autocast(device):
            outputs.append(backbone(x.contiguous(memory_format=torch.channels_last)).float()[:n_valid])
    return torch.cat(outputs)


def cached_features(
    backbone: nn.Module,
    images: ImageSet,
    device: torch.device,
    cache_dir: Path | None,
    view: int | None = None,
    augmentation: Augmentation | None = None,
    weights: str | None = None,
) -> torch.Tensor:
    """`compute_features` for the plain images (view None) or augmented view `view`, through the caches."""
    augmented = None if view is None else (view, augmentation)
    key = fingerprint_of(FEATURES_VERSION, images.fingerprint, weights or weights_digest(backbone), augmented,
                         numerics(device))
    features = MEMORY.get(key)
    if features is not None:
        return features.to(device)
    path = cache_dir / "features" / f"{key}.pt" if cache_dir else None
    features = _read(path, len(images), device)
    if features is None:
        features = _compute_once(backbone, images.images, device, path, view, augmentation)
    MEMORY.put(key, features)
    return features


def _read(path: Path | None, count: int, device: torch.device) -> torch.Tensor | None:
    """The cached features, or None when missing or not what a feature file holds (it is then recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        features = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torn, truncated or foreign: recompute, never fail a trial
        _log.warning("recomputing unreadable feature cache %s (%s)", path, error)
        return None
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != count:
        _log.warning("recomputing feature cache %s: it does not hold features of %d images", path, count)
        return None
    return features.float()


def _compute_once(backbone: nn.Module, images: torch.Tensor, device: torch.device, path: Path | None,
                  view: int | None, augmentation: Augmentation | None) -> torch.Tensor:
    """Compute and save features; workers that need the same file meanwhile wait for it instead of redoing it.

    A cache that cannot be written costs the next trial a recomputation, never this trial its features.
    """
    generator = None if view is None else torch.Generator(device=device).manual_seed(VIEW_SEED_BASE + view)

    def compute() -> torch.Tensor:
        return compute_features(backbone, images, device, augmentation if view is not None else None, generator)

    if path is None:
        return compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as error:
        _log.warning("feature cache folder %s is not writable (%s); features are not kept", path.parent, error)
        return compute()
    try:
        features = _read(path, len(images), device)
        if features is not None:
            return features
        features = compute()
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(features.cpu(), temporary)
            os.replace(temporary, path)  # atomic: readers never see half a file
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
            temporary.unlink(missing_ok=True)
            _log.warning("could not save features to %s (%s); pass a writable --cache-dir to keep them", path, error)
        return features
    finally:
        lock.release()


class FeatureBatches:
    """Batches of cached backbone features: epoch k trains on augmented view (k-1) mod feature_views.

    Like image batches, every training batch has one shape and evaluation batches are padded to another.
    """

    def __init__(
        self,
        backbone: nn.Module,
        parts: dict[str, ImageSet],
        batch_size: int,
        feature_views: int,
        augmentation: Augmentation,
        device: torch.device,
        seed: int,
        cache_dir: Path | None,
    ) -> None:
        weights = weights_digest(backbone)
        augmenting = augmentation != Augmentation()
        self.views = [
            cached_features(backbone, parts["train"], device, cache_dir, v if augmenting else None, augmentation,
                            weights)
            for v in range(feature_views if augmenting else 1)
        ]
        self.eval_features = {
            name: cached_features(backbone, part, device, cache_dir, weights=weights)
            for name, part in parts.items()
            if name != "train"
        }
        self.parts = parts
        self.labels = {name: part.labels.to(device) for name, part in parts.items()}
        self.sampler = TrainSampler(len(parts["train"]), batch_size, torch.Generator(device=device).manual_seed(seed))

    def num_batches(self) -> int:
        return self.sampler.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        view = self.views[(epoch - 1) % len(self.views)]
        for index in self.sampler.epoch():
            yield view[index], self.labels["train"][index]

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Features are rows of 1,280 numbers: a head evaluates them fastest in large batches on any device."""
        features = self.eval_features[part]
        yield from padded_batches(features, self.labels[part], eval_batch_size(len(features), EVAL_BATCH_SIZE))
