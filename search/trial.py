"""The one trial runner: every command that trains (a search worker's trial, `best`'s retrain, `train`) runs here.

It builds the model (seeded), its batch source, optimizer and schedule; resumes from a checkpoint that
carries what made it; runs the epochs, validating after each; and reports each epoch through one callback,
which may raise to end the run (pruning, a stop request, a time budget).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from data import ImageSet
from search.errors import os_reason
from search.family import Family
from search.features import FeatureBatches
from search.pipeline import Augmentation, DataConfig, ImageBatches
from search.training import (BatchSource, Diverged, EpochMetrics, Evaluation, evaluate, make_loss, make_optimizer,
                             make_scaler, make_schedule, numerics, train_epoch)

_log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised from `on_epoch` to stop a run that will be resumed later: its checkpoint is kept."""


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


@dataclass
class Checkpoint:
    """Where a run's last epoch is saved, and what made the run.

    `identity` (study, trial, params, seed, data) is saved with the weights and compared on load, together with
    the conditions the run computes under (`run_conditions`): a file made by another study, trial, setting or
    dataset, or on another kind of device, is never resumed from, only deleted. After a run, `restored_epochs`
    says how many of its epochs came from the file.
    """

    path: Path
    identity: dict[str, Any]
    restored_epochs: int = 0

    def load(self, conditions: dict[str, str]) -> dict[str, Any] | None:
        """The saved state, read to the CPU, when this run under these conditions made it; else None.

        The CPU, whatever the run's device: `optimizer.load_state_dict` moves each state tensor to its parameter's
        device but leaves Adam's step counts where they are, and on a GPU each would cost a host sync every step.
        """
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            made = state.get("identity") if isinstance(state, dict) else None
        except Exception as error:  # noqa: BLE001 - an unreadable checkpoint means starting over, not failing
            _log.warning("ignoring unreadable checkpoint %s (%s)", self.path, error)
            made = None
        expected = {**self.identity, **conditions}
        if made == expected:
            return state
        if isinstance(made, dict) and {k: made.get(k) for k in self.identity} == self.identity:
            made_under = {k: made.get(k) for k in conditions}
            _log.warning("checkpoint %s was made under %s, this run computes under %s; starting over",
                         self.path, made_under, conditions)
        else:
            _log.warning("checkpoint %s was made by another run; starting over", self.path)
        self.discard()
        return None

    def save(self, state: dict[str, Any], conditions: dict[str, str]) -> None:
        """Write then rename, so a run killed mid-write leaves the previous epoch's file intact.

        A checkpoint that cannot be written (a full disk) costs a resume, not the run: a warning, no error.
        """
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:  # a file object: torch's error then carries the OSError
                torch.save({**state, "identity": {**self.identity, **conditions}}, file)
            os.replace(temporary, self.path)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
            with contextlib.suppress(OSError):
                temporary.unlink()
            _log.warning("could not write checkpoint %s (%s); this run cannot resume from it", self.path,
                         os_reason(error))

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def run_conditions(device: torch.device, parts: dict[str, ImageSet]) -> dict[str, str]:
    """What a run's state depends on besides its settings: the numerics (device type and precision) and where the
    images are (on the GPU, or in host memory when they do not fit), which is where its random generators live."""
    return {"numerics": numerics(device), "images": parts["train"].images.device.type}


def resume(checkpoint: Checkpoint, conditions: dict[str, str], source: BatchSource,
           resumable: dict[str, Any]) -> list[EpochMetrics]:
    """Set the source and `resumable` (model, optimizer, schedule, scaler by name) to the checkpoint's last epoch
    and return its epochs; [] (and the file deleted) to start over.

    The source goes first: its random states are the part most tied to a device, and one that cannot take them is
    set back to its first state, so that the run starts over from where a run without the file starts.
    """
    state = checkpoint.load(conditions)
    if state is None:
        return []
    if state.get("source") is not None:
        first = source.state_dict()
        try:
            source.load_state_dict(state["source"])
        except Exception as error:  # noqa: BLE001 - a checkpoint that cannot be resumed means starting over
            source.load_state_dict(first)
            _log.warning("checkpoint %s holds batch state this run cannot take (%s); starting over",
                         checkpoint.path, error)
            checkpoint.discard()
            return []
    for name, part in resumable.items():
        part.load_state_dict(state[name])
    return [EpochMetrics(**row) for row in state["history"]]


def uses_feature_cache(model: nn.Module) -> bool:
    """A frozen backbone (with `backbone`, `head` and `frozen` set): its features are computed once, not per epoch."""
    return bool(getattr(model, "frozen", False)) and hasattr(model, "backbone") and hasattr(model, "head")


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare(family: Family, params: dict[str, Any], parts: dict[str, ImageSet], config: DataConfig,
            device: torch.device, seed: int, data_seed: int | None = None) -> tuple[nn.Module, nn.Module, BatchSource]:
    """Build the model (seeded) and its batch source: (model, module to train, source).

    `seed` sets the initial weights, `data_seed` (default: `seed`) the batch order and augmentation draws:
    a member of a trial pack has its own seed and the pack's data seed.
    """
    model = build_model(family, params, parts, config, device, seed)
    trained, source = batch_source(model, params, parts, config, device, seed if data_seed is None else data_seed)
    return model, trained, source


def build_model(family: Family, params: dict[str, Any], parts: dict[str, ImageSet], config: DataConfig,
                device: torch.device, seed: int) -> nn.Module:
    """The network for `params` on `device`, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    num_classes = len(parts["train"].classes)
    size = parts["train"].images.shape[-1]
    model = family.create_model(params, num_classes=num_classes, image_size=size, weights=config.weights).to(device)
    # channels-last: faster convolutions on GPUs, and on the CPU 2x (inference) to 7x (training) for
    # MobileNetV2's depthwise convolutions
    if has_convolutions(model):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = family.cudnn_benchmark
    return model


def batch_source(model: nn.Module, params: dict[str, Any], parts: dict[str, ImageSet], config: DataConfig,
                 device: torch.device, data_seed: int) -> tuple[nn.Module, BatchSource]:
    """(module to train, its batches): the head on cached features for a frozen backbone, else the model on images."""
    augmentation = Augmentation.of(params)
    if uses_feature_cache(model):
        source = FeatureBatches(model.backbone, parts, int(params["batch_size"]), int(params["feature_views"]),
                                augmentation, device, data_seed, config.cache_dir)
        return model.head, source
    source = ImageBatches(parts, int(params["batch_size"]), augmentation, device, data_seed,
                          channels_last=has_convolutions(model))
    return model, source


def run_trial(
    family: Family,
    params: dict[str, Any],
    parts: dict[str, ImageSet],
    config: DataConfig,
    device: torch.device,
    seed: int,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    on_start: Callable[[nn.Module, BatchSource], None] | None = None,
    checkpoint: Checkpoint | None = None,
    stop_after: int | None = None,
    prepared: tuple[nn.Module, nn.Module, BatchSource] | None = None,
    data_seed: int | None = None,
) -> Fit:
    """Train `family` with `params` on parts["train"], validating on parts["val"] after every epoch.

    The schedule spans params["epochs"]; `stop_after` ends the run earlier on that same schedule (`best`
    retrains up to the trial's best epoch). `on_epoch` also sees the epochs restored from a checkpoint,
    first, so a caller reports one history whatever was resumed. Raises Diverged when an epoch's training
    loss is not finite. The checkpoint is deleted when the run ends, unless it ends by `Interrupted`.
    `prepared` is a (model, module to train, batch source) built elsewhere: the benchmarks' plain path.
    `data_seed` (default: `seed`) sets the batch order and augmentation apart from the initial weights.
    """
    model, trained, source = prepared or prepare(family, params, parts, config, device, seed, data_seed)
    if on_start is not None:
        on_start(model, source)
    optimizer = make_optimizer(trained, params)
    schedule = make_schedule(optimizer, params, source.num_batches())
    scaler = make_scaler(device)
    resumable = {"model": trained, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    conditions = run_conditions(device, parts)
    loss_fn = make_loss(params)
    last = min(int(params["epochs"]), stop_after or int(params["epochs"]))
    history: list[EpochMetrics] = []
    try:
        if checkpoint is not None:
            history = resume(checkpoint, conditions, source, resumable)
            checkpoint.restored_epochs = len(history)
            for metrics in history:
                if on_epoch is not None:
                    on_epoch(metrics)
        for epoch in range(len(history) + 1, last + 1):
            started = time.perf_counter()
            train_loss, train_accuracy = train_epoch(trained, source.train_batches(epoch), optimizer, schedule,
                                                     loss_fn, device, scaler, on_batch, len(parts["train"].classes))
            if not math.isfinite(train_loss):
                raise Diverged(epoch, train_loss)
            val = evaluate(trained, source.eval_batches("val"), loss_fn, device)
            metrics = EpochMetrics(epoch, train_loss, train_accuracy, val.loss, val.accuracy,
                                   time.perf_counter() - started)
            history.append(metrics)
            if checkpoint is not None and epoch < last:
                checkpoint.save({**{name: part.state_dict() for name, part in resumable.items()},
                                 "history": [m.as_dict() for m in history],
                                 "source": source.state_dict() if hasattr(source, "state_dict") else None}, conditions)
            if on_epoch is not None:
                on_epoch(metrics)
    except Interrupted:
        raise
    except Exception:  # the run is over (pruned, diverged, failed): nothing to resume. A killed process keeps it.
        if checkpoint is not None:
            checkpoint.discard()
        raise
    if checkpoint is not None:
        checkpoint.discard()
    return Fit(model, trained, source, history, params)
