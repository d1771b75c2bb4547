"""The one trial runner: every command that trains (a search worker's trial, `best`'s retrain, `train`) runs here.

It builds the model (seeded), its batch source, optimizer and schedule; resumes from a checkpoint that
carries what made it; runs the epochs, validating after each; and reports each epoch through one callback,
which may raise to end the run (pruning, a stop request, a time budget).

One epoch loop (`train_members`) trains every run: a solo trial is a run of one member on a `ModuleLearner`
(torch.optim, its schedule, a GradScaler for fp16), a trial pack (`search.pack`) a run of K members on a
stacked learner. The loop resumes, trains, validates, checkpoints and reports; the learner computes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

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

    def load(self, conditions: dict[str, str], extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The saved state, read to the CPU, when this run under these conditions made it; else None.

        `extra` is identity the run adds to `identity` (a pack's members still in), compared as `identity` is.
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
        identity = {**self.identity, **(extra or {})}
        if made == {**identity, **conditions}:
            return state
        if isinstance(made, dict) and {k: made.get(k) for k in identity} == identity:
            made_under = {k: made.get(k) for k in conditions}
            _log.warning("checkpoint %s was made under %s, this run computes under %s; starting over",
                         self.path, made_under, conditions)
        else:
            _log.warning("checkpoint %s was made by another run; starting over", self.path)
        self.discard()
        return None

    def save(self, state: dict[str, Any], conditions: dict[str, str], extra: dict[str, Any] | None = None) -> None:
        """Write then rename, so a run killed mid-write leaves the previous epoch's file intact (`extra`: see `load`).

        A checkpoint that cannot be written (a full disk) costs a resume, not the run: a warning, no error.
        """
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:  # a file object: torch's error then carries the OSError
                torch.save({**state, "identity": {**self.identity, **(extra or {}), **conditions}}, file)
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


@dataclass
class Member:
    """One trial of a run: its params, the seed its initial weights come from, and where its epochs go.

    A solo trial is a run of one member; a trial pack (`search.pack`) a run of several.
    """

    params: dict[str, Any]
    seed: int
    on_epoch: Callable[[EpochMetrics], None] | None = None


@dataclass
class MemberResult:
    """What a member did: its epochs (those restored from a checkpoint first), why it left early (None: it ran
    every epoch), and its trained weights: the state dict of the module it trained (the head alone on cached
    features), the module's own tensors in a solo run, copies on the CPU in a pack."""

    member: Member
    history: list[EpochMetrics] = field(default_factory=list)
    error: BaseException | None = None
    state: dict[str, torch.Tensor] | None = None


class Learner(Protocol):
    """What `train_members` trains: one row per member still in, row r being member `members[r]` of the run.

    `state_dict(histories)` is everything a checkpoint holds of it (the rows' histories included, so each
    learner keeps its own file format) and `load_state_dict` sets it back and returns those histories;
    `identity()` is what, besides the checkpoint's identity, a saved state must have been made by.
    """

    members: list[int]

    def train_epoch(self, epoch: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    on_batch: Callable[[], None] | None) -> tuple[list[float], list[float]]:
        """One epoch of optimizer steps: each row's (mean training loss, training accuracy)."""
        ...

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> list[Evaluation]: ...

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with these rows only (in this order); the others have left."""
        ...

    def member_state(self, row: int) -> dict[str, torch.Tensor]: ...

    def identity(self) -> dict[str, Any]: ...

    def state_dict(self, histories: list[list[EpochMetrics]]) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> list[list[EpochMetrics]]: ...


class ModuleLearner:
    """One module trained by torch.optim (`make_optimizer`) on its per-step schedule, with a GradScaler for fp16:
    a solo trial, of any network. Its checkpoint holds "model", "optimizer", "schedule", "scaler" and "history"."""

    def __init__(self, module: nn.Module, params: dict[str, Any], device: torch.device, steps_per_epoch: int,
                 num_classes: int) -> None:
        self.module, self.device, self.num_classes = module, device, num_classes
        self.members = [0]
        self.optimizer = make_optimizer(module, params)
        self.schedule = make_schedule(self.optimizer, params, steps_per_epoch)
        self.scaler = make_scaler(device)
        self.loss_fn = make_loss(params)

    def _parts(self) -> dict[str, Any]:
        return {"model": self.module, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler}

    def train_epoch(self, epoch: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    on_batch: Callable[[], None] | None) -> tuple[list[float], list[float]]:
        loss, accuracy = train_epoch(self.module, batches, self.optimizer, self.schedule, self.loss_fn, self.device,
                                     self.scaler, on_batch, self.num_classes)
        return [loss], [accuracy]

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> list[Evaluation]:
        return [evaluate(self.module, batches, self.loss_fn, self.device)]

    def keep(self, rows: Sequence[int]) -> None:
        self.members = [self.members[row] for row in rows]

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def identity(self) -> dict[str, Any]:
        return {}  # the checkpoint's own identity names the one trial

    def state_dict(self, histories: list[list[EpochMetrics]]) -> dict[str, Any]:
        history, = histories
        return {**{name: part.state_dict() for name, part in self._parts().items()},
                "history": [metrics.as_dict() for metrics in history]}

    def load_state_dict(self, state: dict[str, Any]) -> list[list[EpochMetrics]]:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])
        return [[EpochMetrics(**row) for row in state["history"]]]


def train_members(learner: Learner, source: BatchSource, members: Sequence[Member], epochs: int,
                  conditions: dict[str, str], *, checkpoint: Checkpoint | None = None,
                  on_batch: Callable[[], None] | None = None) -> list[MemberResult]:
    """The epoch loop of every run: train `learner`'s members (row r is members[r] at the start) for `epochs`,
    validating each on the "val" batches after every epoch; one result per member, in the order given.

    With a `checkpoint`, the run first resumes from the file when this run (`conditions`, `learner.identity()`)
    made it, and each member's `on_epoch` sees its restored epochs first; after every epoch but the last the
    file is rewritten (the source's random state, the learner's state and the rows' histories).

    A member leaves at an epoch boundary when its training loss is not finite (`Diverged`) or its `on_epoch`
    raises (pruned, a time budget, `Interrupted`, a failure); the others go on, and the run ends when none is
    left. An exception of the learner's own step (out of memory, a wrong output shape) ends every member still
    in, with that error. The checkpoint is deleted when the run ends, unless it ends stopped: when the last
    members leave at one boundary and some of them by `Interrupted`, the file keeps those members alone, to be
    resumed when they come back together. Exceptions that are not `Exception`s (KeyboardInterrupt) propagate.
    """
    return _EpochLoop(learner, source, [MemberResult(member) for member in members], conditions, checkpoint
                      ).run(epochs, on_batch)


class _EpochLoop:
    """One run of `train_members`: the learner, its batches, the members' results, and the checkpoint."""

    def __init__(self, learner: Learner, source: BatchSource, results: list[MemberResult],
                 conditions: dict[str, str], checkpoint: Checkpoint | None) -> None:
        self.learner, self.source, self.results = learner, source, results
        self.conditions, self.checkpoint = conditions, checkpoint
        self.stopped = False  # ended by Interrupted: the checkpoint stays

    def run(self, epochs: int, on_batch: Callable[[], None] | None) -> list[MemberResult]:
        try:
            going, first = self._resume()
            for epoch in range(first, epochs + 1):
                if not going:
                    break
                going = self._epoch(epoch, epochs, on_batch)
        except Exception as error:  # noqa: BLE001 - the learner's own step failed: every member still in ends with it
            for row, index in enumerate(self.learner.members):
                self.results[index].error = error
                self.results[index].state = self.learner.member_state(row)
            self.stopped = isinstance(error, Interrupted)
        else:
            for row, index in enumerate(self.learner.members):
                self.results[index].state = self.learner.member_state(row)
        if self.checkpoint is not None and not self.stopped:
            self.checkpoint.discard()
        return self.results

    def _resume(self) -> tuple[bool, int]:
        """Set the source and learner to the checkpoint's last epoch and replay its epochs to each member's
        `on_epoch`: (whether any member goes on, the first epoch to train).

        The source goes first: its random states are the part most tied to a device, and one that cannot take them
        is set back to its first state, so that the run starts over from where a run without the file starts.
        """
        if self.checkpoint is None:
            return True, 1
        self.checkpoint.restored_epochs = 0
        state = self.checkpoint.load(self.conditions, self.learner.identity())
        if state is None:
            return True, 1
        if state.get("source") is not None:
            first = self.source.state_dict()
            try:
                self.source.load_state_dict(state["source"])
            except Exception as error:  # noqa: BLE001 - a checkpoint that cannot be resumed means starting over
                self.source.load_state_dict(first)
                _log.warning("checkpoint %s holds batch state this run cannot take (%s); starting over",
                             self.checkpoint.path, error)
                self.checkpoint.discard()
                return True, 1
        histories = self.learner.load_state_dict(state)
        restored = self.checkpoint.restored_epochs = len(histories[0])
        leaving: dict[int, Exception] = {}
        for row, history in enumerate(histories):
            result = self.results[self.learner.members[row]]
            for metrics in history:
                result.history.append(metrics)
                try:
                    if result.member.on_epoch is not None:
                        result.member.on_epoch(metrics)
                except Exception as error:  # noqa: BLE001 - as in `_epoch`
                    leaving[row] = error
                    break
        return self._leave(leaving), restored + 1

    def _epoch(self, epoch: int, last: int, on_batch: Callable[[], None] | None) -> bool:
        """Train and validate the members still in for one epoch, save, report; whether any member goes on."""
        started = time.perf_counter()
        losses, accuracies = self.learner.train_epoch(epoch, self.source.train_batches(epoch), on_batch)
        diverged = {row: Diverged(epoch, loss) for row, loss in enumerate(losses) if not math.isfinite(loss)}
        if not self._leave(diverged):
            return False
        losses = [loss for row, loss in enumerate(losses) if row not in diverged]
        accuracies = [accuracy for row, accuracy in enumerate(accuracies) if row not in diverged]
        evaluations = self.learner.evaluate(self.source.eval_batches("val"))
        seconds = time.perf_counter() - started
        rows = [self.results[index] for index in self.learner.members]
        for row, result in enumerate(rows):
            result.history.append(EpochMetrics(epoch, losses[row], accuracies[row], evaluations[row].loss,
                                               evaluations[row].accuracy, seconds))
        if self.checkpoint is not None and epoch < last:
            self._save()
        leaving: dict[int, Exception] = {}
        for row, result in enumerate(rows):
            try:
                if result.member.on_epoch is not None:
                    result.member.on_epoch(result.history[-1])
            except Exception as error:  # noqa: BLE001 - pruned, out of time, stopped or failed: this member leaves
                leaving[row] = error
        return self._leave(leaving)

    def _leave(self, leaving: dict[int, Exception]) -> bool:
        """Members `leaving` (row: why) leave; whether any member goes on."""
        if not leaving:
            return True
        for row, error in leaving.items():
            result = self.results[self.learner.members[row]]
            result.error, result.state = error, self.learner.member_state(row)
        staying = [row for row in range(len(self.learner.members)) if row not in leaving]
        if staying:
            self.learner.keep(staying)
            return True
        stopped = [row for row, error in leaving.items() if isinstance(error, Interrupted)]
        self.stopped = bool(stopped)
        if stopped and len(stopped) < len(leaving) and self.checkpoint is not None:
            self.learner.keep(stopped)  # the checkpoint keeps the members to be resumed, not those that ended
            self._save()
        self.learner.keep([])
        return False

    def _save(self) -> None:
        histories = [self.results[index].history for index in self.learner.members]
        state = {**self.learner.state_dict(histories),
                 "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None}
        self.checkpoint.save(state, self.conditions, self.learner.identity())


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
    loss is not finite, and whatever `on_epoch` or a training step raised. The checkpoint is deleted when the
    run ends, unless it ends by `Interrupted`.
    `prepared` is a (model, module to train, batch source) built elsewhere: the benchmarks' plain path.
    `data_seed` (default: `seed`) sets the batch order and augmentation apart from the initial weights.
    A run of one member on a `ModuleLearner` through `train_members`, the loop trial packs run through too.
    """
    model, trained, source = prepared or prepare(family, params, parts, config, device, seed, data_seed)
    if on_start is not None:
        on_start(model, source)
    learner = ModuleLearner(trained, params, device, source.num_batches(), len(parts["train"].classes))
    last = min(int(params["epochs"]), stop_after or int(params["epochs"]))
    result, = train_members(learner, source, [Member(params, seed, on_epoch)], last, run_conditions(device, parts),
                            checkpoint=checkpoint, on_batch=on_batch)
    if result.error is not None:
        raise result.error
    return Fit(model, trained, source, result.history, params)
