"""The pack runner: K trials of one family that share their shapes and data, trained as one stacked model.

Each member is built exactly as its solo trial is (`search.trial.build_model` with the member's own seed), so
it starts from the solo run's weights; the members' trained modules are stacked (`models.stacked`) and
stepped by one `StackedOptimizer` with each member's own optimizer kind, learning rate, schedule, weight
decay, momentum, dropout and loss. One batch stream (`search.trial.batch_source`, seeded with the pack's
data seed) feeds every member: a member and its solo run with that data seed see the same batches.

After every epoch each member is validated and reported to its own `on_epoch`. A member leaves the pack at
that epoch boundary when its training loss is not finite (`Diverged`) or when its `on_epoch` raises (pruned,
a time budget, a stop request, a failure): it is sliced out of the stacked weights, optimizer state and
batch-norm statistics, and the others go on. A failure of the pack's own step (out of memory, say) ends
every member still in it, with that error. A pack whose members are all gone ends.

`search.trial.run_trial` still trains a solo trial its own way (torch.optim, checkpoints); a pack of one
follows it to float precision (tests/test_packs.py), and a member retrained alone with its seed and the
pack's data seed follows its packed curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from data import ImageSet
from models.stacked import StackedNet
from search.family import Family
from search.pack.optim import KINDS, StackedOptimizer
from search.pipeline import DataConfig
from search.training import BatchSource, Diverged, EpochMetrics, Evaluation, autocast, autocast_dtype, lr_factor
from search.trial import batch_source, build_model, uses_feature_cache


@dataclass
class Member:
    """One trial of a pack: its params, the seed its initial weights come from, and where its epochs go."""

    params: dict[str, Any]
    seed: int
    on_epoch: Callable[[EpochMetrics], None] | None = None


@dataclass
class MemberResult:
    """What a member did: its epochs, why it left early (None: it ran every epoch), and its trained weights
    (the state dict of the module the pack trained: the head alone on cached features), on the CPU."""

    member: Member
    history: list[EpochMetrics] = field(default_factory=list)
    error: BaseException | None = None
    state: dict[str, torch.Tensor] | None = None


def member_losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor | None) -> torch.Tensor:
    """Each member's mean loss [K] from logits [K, B, classes]: cross entropy (which NLL over log-softmax is),
    with member k's label smoothing smoothing[k] when given, as `torch.nn.functional.cross_entropy` defines it."""
    log_probs = torch.log_softmax(logits.float(), dim=2)
    nll = -log_probs.gather(2, labels.view(1, -1, 1).expand(len(log_probs), -1, 1)).mean(dim=(1, 2))
    if smoothing is None:
        return nll
    return (1 - smoothing) * nll + smoothing * -log_probs.mean(dim=2).mean(dim=1)


def check_pack(family: Family, members: Sequence[Member]) -> None:
    """Members of one pack share every parameter but the family's `pack_members`; a ValueError says which not."""
    if not members:
        raise ValueError("a pack needs at least one member")
    if len(members) > 1 and not family.pack_members:
        raise ValueError(f"family {family.name} declares no pack_members: it trains in packs of one")
    shared = family.pack_shared(members[0].params)
    for member in members[1:]:
        other = family.pack_shared(member.params)
        if other != shared:
            differ = sorted(k for k in shared.keys() | other.keys() if shared.get(k) != other.get(k))
            raise ValueError(f"pack members of {family.name} differ in shared parameters: {', '.join(differ)}")


class _Pack:
    """The members still training: the stacked module, its optimizer, and per row (stacked index) the member's
    index in `run_pack`'s list (`members`) and its params."""

    def __init__(self, net: StackedNet, members: list[int], params: list[dict[str, Any]], device: torch.device):
        self.net, self.members, self.params, self.device = net, members, params, device
        self.optimizer = StackedOptimizer(net.parameters(), [p["optimizer"] for p in params],
                                          [float(p["weight_decay"]) for p in params],
                                          [float(p.get("momentum", 0.0)) for p in params])
        self._set_hyperparameters()

    def _set_hyperparameters(self) -> None:
        self.base_lr = torch.tensor([float(p["lr"]) for p in self.params], dtype=torch.float64, device=self.device)
        smoothing = [float(p["label_smoothing"]) if p["loss"] == "label_smoothing" else 0.0 for p in self.params]
        self.smoothing = torch.tensor(smoothing, device=self.device) if any(smoothing) else None

    def learning_rates(self, epoch: int, steps_per_epoch: int) -> torch.Tensor:
        """[steps, K] float64: each member's rate at each step of `epoch`, base rate x its schedule's factor."""
        first = (epoch - 1) * steps_per_epoch
        factors = [[lr_factor(p, step, steps_per_epoch) for p in self.params]
                   for step in range(first, first + steps_per_epoch)]
        return torch.tensor(factors, dtype=torch.float64).to(self.device, non_blocking=True) * self.base_lr

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], learning_rates: torch.Tensor,
                    on_batch: Callable[[], None] | None, max_steps: int | None = None) -> tuple[list[float], list[float]]:
        """One pass of optimizer steps (the first `max_steps` only, if given); each member's (mean training loss,
        training accuracy), read once."""
        self.net.train()
        k = len(self.members)
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        count = 0
        for step, (x, y) in enumerate(batches):
            with autocast(self.device):
                logits = self.net(x)
                losses = member_losses(logits, y, self.smoothing)
            self.optimizer.zero_grad()
            losses.sum().backward()  # members' parameters are disjoint: each gets its own loss's gradient
            self.optimizer.step(learning_rates[step])
            loss_sum += losses.detach() * len(y)
            correct += (logits.detach().argmax(2) == y).sum(1)
            count += len(y)
            if on_batch is not None:
                on_batch()
            if max_steps is not None and step + 1 >= max_steps:
                break
        count = max(count, 1)
        return [loss / count for loss in loss_sum.tolist()], [hits / count for hits in correct.tolist()]

    @torch.inference_mode()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> list[Evaluation]:
        """Each member's `search.training.evaluate` of one split, in one pass."""
        self.net.eval()
        k = len(self.members)
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        predictions, count = [], 0
        for x, y, *valid in batches:
            with autocast(self.device):
                logits = self.net(x)
            n = int(valid[0]) if valid else len(y)
            logits, y = logits[:, :n], y[:n]
            loss_sum += member_losses(logits, y, self.smoothing) * n
            predicted = logits.argmax(2)
            correct += (predicted == y).sum(1)
            predictions.append(predicted)
            count += n
        losses, hits = loss_sum.tolist(), correct.tolist()
        predicted = torch.cat(predictions, 1).cpu() if predictions else torch.empty(k, 0, dtype=torch.long)
        return [Evaluation(losses[r] / max(count, 1), hits[r] / max(count, 1), predicted[r]) for r in range(k)]

    def state(self, row: int) -> dict[str, torch.Tensor]:
        return {name: tensor.cpu() for name, tensor in self.net.member_state_dict(row).items()}

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with these rows only; the others have left."""
        if not rows:
            self.members, self.params = [], []
            return
        self.net.keep(rows)
        self.optimizer.keep(rows)
        self.members = [self.members[r] for r in rows]
        self.params = [self.params[r] for r in rows]
        self._set_hyperparameters()


def build_pack(family: Family, members: Sequence[Member], parts: dict[str, ImageSet], config: DataConfig,
               device: torch.device, data_seed: int) -> tuple[_Pack, BatchSource]:
    """The stacked members, each built as its solo trial is, and the one batch stream that feeds them."""
    # members of one optimizer kind in consecutive rows: the optimizer updates each kind's rows as one view
    order = sorted(range(len(members)), key=lambda i: KINDS.index(members[i].params["optimizer"]))
    models, generators = [], []
    for i in order:
        models.append(build_model(family, members[i].params, parts, config, device, members[i].seed))
        generators.append(torch.Generator().set_state(torch.get_rng_state()))  # where its solo dropout starts
    _, source = batch_source(models[0], members[order[0]].params, parts, config, device, data_seed)
    trained = [model.head if uses_feature_cache(model) else model for model in models]
    # On the CPU each member draws its dropout masks as its solo run does; on a GPU one draw serves all
    # (solo runs there use a fused kernel whose masks a pack does not reproduce).
    net = StackedNet.of(trained, generators if device.type == "cpu" else None)
    return _Pack(net, order, [members[i].params for i in order], device), source


def run_pack(
    family: Family,
    members: Sequence[Member],
    parts: dict[str, ImageSet],
    config: DataConfig,
    device: torch.device,
    data_seed: int,
    *,
    on_batch: Callable[[], None] | None = None,
) -> list[MemberResult]:
    """Train `members` as one pack on parts["train"], validating each on parts["val"] after every epoch.

    Returns one result per member, in the order given. Raises ValueError when the members do not share the
    family's shared parameters or the device computes in fp16, and `models.stacked.NotStackable` when the
    family's network cannot be stacked.
    """
    check_pack(family, members)
    if autocast_dtype(device) == torch.float16:
        raise ValueError(f"{device} computes in fp16, whose loss scaling would skip every member's step when one "
                         "member overflows; trial packs run in bf16 or fp32")
    results = [MemberResult(member) for member in members]
    pack, source = build_pack(family, members, parts, config, device, data_seed)
    epochs = int(members[0].params["epochs"])
    try:
        for epoch in range(1, epochs + 1):
            _epoch(pack, source, epoch, results, on_batch)
            if not pack.members:
                break
    except Exception as error:  # noqa: BLE001 - the pack's own step failed: every member still in it ends with it
        for row, member in enumerate(pack.members):
            results[member].error = error
            results[member].state = pack.state(row)
        return results
    for row, member in enumerate(pack.members):
        results[member].state = pack.state(row)
    return results


def _epoch(pack: _Pack, source: BatchSource, epoch: int, results: list[MemberResult],
           on_batch: Callable[[], None] | None) -> None:
    """Train and validate every member for one epoch; those that diverge or whose `on_epoch` raises leave."""
    started = time.perf_counter()
    steps = source.num_batches()
    losses, accuracies = pack.train_epoch(source.train_batches(epoch), pack.learning_rates(epoch, steps), on_batch)
    diverged = {row: Diverged(epoch, loss) for row, loss in enumerate(losses) if not math.isfinite(loss)}
    _leave(pack, diverged, results)
    if not pack.members:
        return
    losses = [loss for row, loss in enumerate(losses) if row not in diverged]
    accuracies = [accuracy for row, accuracy in enumerate(accuracies) if row not in diverged]
    evaluations = pack.evaluate(source.eval_batches("val"))
    seconds = time.perf_counter() - started
    leaving: dict[int, BaseException] = {}
    for row, member in enumerate(pack.members):
        metrics = EpochMetrics(epoch, losses[row], accuracies[row], evaluations[row].loss, evaluations[row].accuracy,
                               seconds)
        results[member].history.append(metrics)
        on_epoch = results[member].member.on_epoch
        try:
            if on_epoch is not None:
                on_epoch(metrics)
        except Exception as error:  # noqa: BLE001 - pruned, out of time, stopped or failed: this member leaves
            leaving[row] = error
    _leave(pack, leaving, results)


def _leave(pack: _Pack, leaving: dict[int, BaseException], results: list[MemberResult]) -> None:
    if not leaving:
        return
    for row, error in leaving.items():
        member = pack.members[row]
        results[member].error = error
        results[member].state = pack.state(row)
    pack.keep([row for row in range(len(pack.members)) if row not in leaving])


__all__ = ["Member", "MemberResult", "build_pack", "check_pack", "member_losses", "run_pack"]
