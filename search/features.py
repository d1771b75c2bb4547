"""A frozen backbone's features, computed once and reused by every trial that trains a head on them.

Features are keyed by a hash of the images, the backbone's weights and the augmentation view, kept in
memory for the worker's life and on disk across processes. Augmentation stays meaningful: a fixed number
of augmented views of the training images is cached and each epoch draws one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import weakref
import sys
from pathlib import Path
from typing import Iterator

import torch
from filelock import FileLock
from torch import nn
from tqdm import tqdm

from data import ImageSet, augment, batches, normalize
from search.training import EVAL_BATCH_SIZE, autocast

VIEW_SEED_BASE = 10_000  # views are shared by all trials, so their randomness must not depend on a trial's seed
_MEMORY: dict[str, torch.Tensor] = {}
# A worker keeps its image tensors for its whole life and never changes them in place: hash each one once,
# not once per view and per trial.
_IMAGE_DIGESTS: dict[int, str] = {}  # by id(tensor); an entry leaves with its tensor


def _digest(*parts: object) -> str:
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(part, nn.Module):
            for name, tensor in part.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:20]


def _images_digest(images: torch.Tensor) -> str:
    key = id(images)
    if key not in _IMAGE_DIGESTS:
        _IMAGE_DIGESTS[key] = _digest(images)
        weakref.finalize(images, _IMAGE_DIGESTS.pop, key, None)  # so a later tensor with this id is hashed anew
    return _IMAGE_DIGESTS[key]


@torch.inference_mode()
def compute_features(
    backbone: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    flip_p: float = 0.0,
    max_rotation: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Backbone outputs of uint8 images (optionally one augmented view of them), float32 [N, F] on `device`."""
    backbone.eval()
    outputs = []
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    batch_size = EVAL_BATCH_SIZE // 4
    progress = tqdm(batches(images, labels, batch_size, shuffle=False), total=-(-len(images) // batch_size),
                    desc="backbone features (computed once)", unit="batch", leave=False, disable=None, file=sys.stderr)
    for x, _ in progress:
        x = normalize(x.to(device, non_blocking=True))
        if generator is not None:
            x = augment(x, flip_p, max_rotation, generator)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            outputs.append(backbone(x).float())
    return torch.cat(outputs)


def cached_features(
    backbone: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    cache_dir: Path | None,
    view: int | None = None,
    flip_p: float = 0.0,
    max_rotation: float = 0.0,
    weights_digest: str | None = None,
) -> torch.Tensor:
    """`compute_features` for the plain images (view None) or augmented view `view`, through the caches."""
    weights_digest = weights_digest or _digest(backbone)
    augmentation = None if view is None else (view, float(flip_p), float(max_rotation))
    key = _digest(_images_digest(images), weights_digest, augmentation)
    if key in _MEMORY:
        return _MEMORY[key].to(device)
    path = cache_dir / "features" / f"{key}.pt" if cache_dir else None
    features = None
    if path is not None and path.is_file():
        try:
            features = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            features = None  # a torn cache file is recomputed
    if features is None:
        features = _compute_once(backbone, images, device, path, view, flip_p, max_rotation)
    _MEMORY[key] = features
    return features


def _compute_once(backbone: nn.Module, images: torch.Tensor, device: torch.device, path: Path | None,
                  view: int | None, flip_p: float, max_rotation: float) -> torch.Tensor:
    """Compute and save features; workers that need the same file meanwhile wait for it instead of redoing it."""
    generator = None if view is None else torch.Generator(device=device).manual_seed(VIEW_SEED_BASE + view)
    if path is None:
        return compute_features(backbone, images, device, flip_p, max_rotation, generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            with contextlib.suppress(RuntimeError, OSError, EOFError, pickle.UnpicklingError):
                return torch.load(path, map_location=device, weights_only=True)
        features = compute_features(backbone, images, device, flip_p, max_rotation, generator)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(features.cpu(), tmp)
        tmp.replace(path)  # atomic: readers never see half a file
    return features


class FeatureBatches:
    """Batches of cached backbone features: epoch k trains on augmented view (k-1) mod feature_views."""

    def __init__(
        self,
        backbone: nn.Module,
        parts: dict[str, ImageSet],
        batch_size: int,
        feature_views: int,
        flip_p: float,
        max_rotation: float,
        device: torch.device,
        seed: int,
        cache_dir: Path | None,
    ) -> None:
        weights = _digest(backbone)
        augmenting = flip_p > 0 or max_rotation > 0
        train_images = parts["train"].images
        self.views = [
            cached_features(backbone, train_images, device, cache_dir, v if augmenting else None, flip_p, max_rotation, weights)
            for v in range(feature_views if augmenting else 1)
        ]
        self.parts = parts
        self.eval_features = {
            name: cached_features(backbone, part.images, device, cache_dir, None, weights_digest=weights)
            for name, part in parts.items()
            if name != "train"
        }
        self.labels = {name: part.labels.to(device) for name, part in parts.items()}
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def num_batches(self) -> int:
        return -(-len(self.labels["train"]) // self.batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        view = self.views[(epoch - 1) % len(self.views)]
        yield from batches(view, self.labels["train"], self.batch_size, shuffle=True, generator=self.generator)

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from batches(self.eval_features[part], self.labels[part], EVAL_BATCH_SIZE, shuffle=False)
