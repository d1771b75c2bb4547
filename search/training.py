"""What one epoch of training and one evaluation are, for every model: optimizer, schedule, loss, the steps.

The training parameters are declared once, as search dimensions (`training_space`), with their defaults and
valid limits. Metrics stay on the device during an epoch and are read once at its end, so a CUDA run does
not wait on the host after every batch. `search.trial.train_members` runs the epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from search.errors import FamilyError, UserError
from search.space import Dim, choice, integer, real

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LOSSES = ("cross_entropy", "nll", "label_smoothing")
SCHEDULES = ("constant", "cosine", "onecycle")
ONECYCLE_MIN_WARMUP = 0.25  # share of the steps a one-cycle schedule rises over when warmup_epochs is shorter


def augmentation_space() -> list[Dim]:
    """Flip, rotation, translation and cutout, searched as ranges: each trial augments its own batches."""
    return [
        real("flip_p", 0.0, 0.5, default=0.5, limits=(0.0, 1.0), help="horizontal flip probability"),
        real("max_rotation", 0.0, 15.0, default=8.0, limits=(0.0, 180.0), help="degrees"),
        real("translate", 0.0, 0.125, default=0.0, limits=(0.0, 0.5),
             help="random shift, up to this share of the image side (pad and crop)"),
        real("cutout", 0.0, 0.5, default=0.0, limits=(0.0, 1.0), help="side of one blanked square, share of the side"),
    ]


def cached_augmentation_space() -> list[Dim]:
    """The same levers as a few choices, for a frozen backbone whose augmented views are computed once and
    cached: every distinct setting is a new pass of the backbone, so trials should share settings."""
    return [
        choice("flip_p", 0.5, 0.0, limits=(0.0, 1.0), help="horizontal flip probability"),
        choice("max_rotation", 8.0, 0.0, limits=(0.0, 180.0), help="degrees"),
        choice("translate", 0.0, 0.125, limits=(0.0, 0.5), help="random shift, share of the image side"),
        choice("cutout", 0.0, 0.25, limits=(0.0, 1.0), help="side of one blanked square, share of the side"),
    ]


def training_space(
    lr: tuple[float, float] = (1e-4, 1e-2),
    weight_decay: tuple[float, float] = (1e-6, 1e-2),
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256),
    epochs: int = 20,
    augmentation: list[Dim] | None = None,
) -> list[Dim]:
    """The training dimensions every family shares; a family chooses the searched ranges, the epoch budget and,
    if it must, how augmentation is searched (default `augmentation_space()`)."""
    return [
        choice("optimizer", *OPTIMIZERS, default="adam"),
        real("lr", *lr, log=True, default=1e-3, limits=(1e-8, 10.0), help="peak learning rate"),
        real("momentum", 0.5, 0.99, default=0.9, limits=(0.0, 0.999),
             when=lambda p: p["optimizer"] in ("sgd", "rmsprop")),
        real("weight_decay", *weight_decay, log=True, default=0.0, limits=(0.0, 1.0)),
        choice("batch_size", *batch_sizes, default=64, limits=(1, 1 << 16)),
        choice("loss", *LOSSES, default="cross_entropy"),
        real("label_smoothing", 0.01, 0.2, default=0.1, limits=(0.0, 0.5), when=lambda p: p["loss"] == "label_smoothing"),
        integer("epochs", epochs, epochs, limits=(1, 10_000),
                help="a budget: pruning decides how much of it a trial gets"),
        choice("lr_schedule", *SCHEDULES, default="constant", help="over the epoch budget, per step"),
        integer("warmup_epochs", 0, 3, default=0, limits=(0, 10_000), help="linear warm-up from zero"),
        *(augmentation_space() if augmentation is None else augmentation),
    ]


# The training parameters that may differ between the members of a trial pack (see `Family.pack_members`).
PACK_MEMBER_PARAMS = ("optimizer", "lr", "momentum", "weight_decay", "loss", "label_smoothing", "lr_schedule",
                      "warmup_epochs")


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


def check_outputs(outputs: Any, batch: int, num_classes: int, who: str = "the model") -> None:
    """A classifier's outputs are logits [batch, num_classes]: with more columns than classes, cross entropy
    still runs and the accuracy is meaningless, so any other shape is a FamilyError."""
    shape = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
    if shape != [batch, num_classes]:
        raise FamilyError(f"{who} outputs {shape} for a batch of {batch}, expected [{batch}, {num_classes}] "
                          "(batch, classes)")


class BatchSource(Protocol):
    """Where batches come from: images augmented on the device, or cached backbone features."""

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def eval_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def num_batches(self) -> int: ...


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters grouped for the optimizer; "lr_scale" multiplies a group's learning rate.

    A model may define `parameter_groups()` itself (a fine-tuned backbone learns slower than its head).
    """
    own = getattr(model, "parameter_groups", None)
    if callable(own):
        return own()
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]


def make_optimizer(model: nn.Module, params: dict[str, Any]) -> torch.optim.Optimizer:
    kind, lr, decay = params["optimizer"], float(params["lr"]), float(params["weight_decay"])
    groups = [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in parameter_groups(model) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameter")
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    momentum = float(params["momentum"])
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=decay)
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=decay)


def lr_factor(params: dict[str, Any], step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based), defined over the whole epoch budget.

    constant: 1 after warm-up. cosine: warm-up, then half a cosine down to 0. onecycle: a linear rise over at
    least a quarter of the steps, then a linear fall to 0. The warm-up is linear from 1/steps.
    """
    total = max(1, int(params["epochs"]) * steps_per_epoch)
    warmup = min(total, int(params.get("warmup_epochs", 0)) * steps_per_epoch)
    schedule = params.get("lr_schedule", "constant")
    if schedule == "onecycle":
        warmup = max(warmup, math.ceil(ONECYCLE_MIN_WARMUP * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_schedule(optimizer: torch.optim.Optimizer, params: dict[str, Any], steps_per_epoch: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule of `lr_factor`; its state goes into checkpoints with the optimizer's."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(params, step, steps_per_epoch))


def make_loss(params: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross entropy, NLL over log-softmax (the same function), or cross entropy with label smoothing.

    NLL over raw logits, which sank some of the study's runs to chance, is not offered: it is a bug.
    """
    kind = params["loss"]
    if kind == "nll":
        return lambda logits, y: nn.functional.nll_loss(torch.log_softmax(logits.float(), dim=1), y)
    smoothing = float(params["label_smoothing"]) if kind == "label_smoothing" else 0.0
    return lambda logits, y: nn.functional.cross_entropy(logits.float(), y, label_smoothing=smoothing)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed precision of every run on `device`, None for fp32.

    bf16 where the GPU runs it natively (compute capability 8.0 and up: A100, H100, RTX 30xx and later); fp16 with
    loss scaling (`make_scaler`) on Volta and Turing (V100, T4), where bf16 falls back to slow kernels; fp32 on
    older GPUs, which lack tensor cores, and on the CPU, where it is exact and reproducible.
    """
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16 if major >= 7 else None


def numerics(device: torch.device) -> str:
    """How runs compute on `device`, e.g. "cuda-bf16" or "cpu-fp32": part of what cached features and checkpoints
    were made with, so that those made otherwise are not reused."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
    return f"{device.type}-{names[autocast_dtype(device)]}"


def autocast(device: torch.device):
    """Mixed precision in `autocast_dtype(device)`; a no-op where that is fp32."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose narrow range would flush small gradients to zero; disabled (it then passes
    the loss and the step through unchanged) for bf16 and fp32. Its state goes into checkpoints."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted ones."""
    counts = torch.bincount(labels.cpu() * num_classes + predictions.cpu(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], loss_fn, device: torch.device) -> Evaluation:
    """Mean loss, accuracy and predictions over one split, in inference mode.

    A batch is (x, y) or (x, y, n_valid): batches padded to one shape count only their first n_valid rows.
    """
    model.eval()
    loss_sum = torch.zeros((), device=device)
    predictions, count, correct = [], 0, torch.zeros((), device=device, dtype=torch.long)
    for x, y, *valid in batches:
        with autocast(device):
            logits = model(x)
        n = int(valid[0]) if valid else len(y)
        logits, y = logits[:n], y[:n]
        loss_sum += loss_fn(logits, y) * n
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        predictions.append(predicted)
        count += n
    return Evaluation(
        loss=loss_sum.item() / max(count, 1),
        accuracy=correct.item() / max(count, 1),
        predictions=torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),
    )


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss_fn,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    on_batch: Callable[[], None] | None = None,
    num_classes: int | None = None,
) -> tuple[float, float]:
    """One pass of optimizer steps; returns (mean training loss, training accuracy), read once at the end.

    `scaler` (from `make_scaler`) scales the loss for fp16; it skips a step whose gradients overflowed. With
    `num_classes`, the first batch's logits are checked to be [batch, num_classes] (`check_outputs`).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for x, y in batches:
        with autocast(device):
            logits = model(x)
            if num_classes is not None and count == 0:
                check_outputs(logits, len(y), num_classes)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        count += len(y)
        if on_batch is not None:
            on_batch()
    return loss_sum.item() / max(count, 1), correct.item() / max(count, 1)
