"""The one training loop every model and every trial uses.

A run is a model, batches from a source, and a flat params dict. Metrics stay on the device during an
epoch and are read once at its end, so a CUDA run does not wait on the host after every batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from models import ParamError, parameter_groups
from models.params import get_choice, get_float, get_int

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LOSSES = ("cross_entropy", "nll", "label_smoothing")
TRAINING_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "momentum": 0.9,  # SGD and RMSprop only
    "batch_size": 64,
    "epochs": 20,
    "loss": "cross_entropy",
    "label_smoothing": 0.1,  # loss == "label_smoothing" only
    "flip_p": 0.5,
    "max_rotation": 8.0,
    "feature_views": 4,  # frozen backbone only: augmented views whose features are computed once
}
EVAL_BATCH_SIZE = 1024


class Diverged(Exception):
    """The training loss became NaN or infinite; the run cannot recover."""

    def __init__(self, epoch: int, loss: float) -> None:
        super().__init__(f"diverged at epoch {epoch}: training loss is {loss}")
        self.epoch = epoch


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # int64 [N] on the CPU


class BatchSource(Protocol):
    """Where batches come from: images augmented on the device, or cached backbone features."""

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def num_batches(self) -> int: ...


def make_optimizer(model: nn.Module, params: dict[str, Any]) -> torch.optim.Optimizer:
    kind = get_choice(params, "optimizer", OPTIMIZERS)
    lr = get_float(params, "lr", 1e-8, 10.0)
    decay = get_float(params, "weight_decay", 0.0, 1.0)
    groups = [
        {"params": g["params"], "lr": lr * g["lr_scale"]} for g in parameter_groups(model) if g["params"]
    ]
    if not groups:
        raise ParamError("the model has no trainable parameter")
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    momentum = get_float(params, "momentum", 0.0, 0.999)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=decay)
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=decay)


def make_loss(params: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross entropy, NLL over log-softmax (the same function), or cross entropy with label smoothing.

    NLL over raw logits, which sank some of the study's runs to chance, is not offered: it is a bug.
    """
    kind = get_choice(params, "loss", LOSSES)
    if kind == "nll":
        return lambda logits, y: nn.functional.nll_loss(torch.log_softmax(logits.float(), dim=1), y)
    smoothing = get_float(params, "label_smoothing", 0.0, 0.5) if kind == "label_smoothing" else 0.0
    return lambda logits, y: nn.functional.cross_entropy(logits.float(), y, label_smoothing=smoothing)


def autocast(device: torch.device):
    """bfloat16 mixed precision on CUDA; full precision on the CPU, where it is exact and reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_training_params(params: dict[str, Any]) -> None:
    """Fail before any work for a bad training value, not after the data are loaded."""
    get_int(params, "batch_size", 1, 1 << 16)
    get_int(params, "epochs", 1, 10_000)
    if "feature_views" in params:
        get_int(params, "feature_views", 1, 64)
    get_float(params, "flip_p", 0.0, 1.0)
    get_float(params, "max_rotation", 0.0, 180.0)
    make_loss(params)
    if get_choice(params, "optimizer", OPTIMIZERS) in ("sgd", "rmsprop"):
        get_float(params, "momentum", 0.0, 0.999)
    get_float(params, "lr", 1e-8, 10.0)
    get_float(params, "weight_decay", 0.0, 1.0)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn, device: torch.device) -> Evaluation:
    """Mean loss, accuracy and predictions over one split, in inference mode."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    predictions, count, correct = [], 0, torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches:
        with autocast(device):
            logits = model(x)
        loss_sum += loss_fn(logits, y) * len(y)
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        predictions.append(predicted)
        count += len(y)
    return Evaluation(
        loss=loss_sum.item() / max(count, 1),
        accuracy=correct.item() / max(count, 1),
        predictions=torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),
    )


def train(
    model: nn.Module,
    source: BatchSource,
    params: dict[str, Any],
    device: torch.device,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    first_epoch: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[EpochMetrics]:
    """Train for params["epochs"] epochs, validating after each one.

    `on_epoch` sees each epoch's metrics and may raise to stop the run (pruning, a stop request).
    Raises Diverged as soon as an epoch's training loss is not finite.
    """
    check_training_params(params)
    epochs = int(params["epochs"])
    optimizer = optimizer or make_optimizer(model, params)
    loss_fn = make_loss(params)
    history = []
    for epoch in range(first_epoch, epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        for x, y in source.train_batches(epoch):
            with autocast(device):
                logits = model(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            count += len(y)
            if on_batch is not None:
                on_batch()
        train_loss = loss_sum.item() / max(count, 1)
        if not math.isfinite(train_loss):
            raise Diverged(epoch, train_loss)
        val = evaluate(model, source.eval_batches("val"), loss_fn, device)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=correct.item() / max(count, 1),
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            seconds=time.perf_counter() - started,
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return history
