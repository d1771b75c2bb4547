"""The pack runner: K trials of one family that share their shapes and data, trained as one stacked model.

Each member is built exactly as its solo trial is (`search.trial.build_model` with the member's own seed), so
it starts from the solo run's weights; the members' trained modules are stacked (`models.stacked`) and
stepped by one `StackedOptimizer` with each member's own optimizer kind, learning rate, schedule, weight
decay, momentum, dropout and loss. One batch stream (`search.trial.batch_source`, seeded with the pack's
data seed) feeds every member: a member and its solo run with that data seed see the same batches.

A pack runs through the one epoch loop of every trial (`search.trial.train_members`), on a `StackedLearner`
where a solo trial runs on a `search.trial.ModuleLearner`. After every epoch each member is validated and
reported to its own `on_epoch`. A member leaves the pack at that epoch boundary when its training loss is not
finite (`Diverged`) or when its `on_epoch` raises (pruned, a time budget, a stop request, a failure): it is
sliced out of the stacked weights, optimizer state and batch-norm statistics, and the others go on. A failure
of the pack's own step (out of memory, say) ends every member still in it, with that error. A pack whose
members are all gone ends.

Checkpoints are per pack: the stacked state, optimizer state, batch state, histories and the members still in.
A pack that ends stopped (its last members leave at one epoch boundary, some by `search.trial.Interrupted`, as
on a worker's stop request) keeps the file, holding the stopped members alone; it resumes from it when those
same members (params and seeds) come back as one pack, in any order, with the same data seed. Any other pack
deletes the file and starts over, and a pack that ends otherwise deletes it.

A pack of one follows `search.trial.run_trial` to float precision (tests/test_packs.py), and a member retrained
alone with its seed and the pack's data seed follows its packed curve.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from data import ImageSet
from models.stacked import StackedNet
from search.family import Family
from search.pack.optim import KINDS, StackedOptimizer
from search.pipeline import DataConfig
from search.training import (BatchSource, EpochMetrics, Evaluation, autocast, autocast_dtype, check_outputs,
                             lr_factor)
from search.trial import (Checkpoint, Member, MemberResult, batch_source, build_model, run_conditions, train_members,
                          uses_feature_cache)


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


class StackedLearner:
    """The members still in a pack as one `StackedNet`, stepped by one `StackedOptimizer` (a `search.trial.Learner`):
    row r is member `members[r]` of the run, with its params and seed.

    Rows are ordered by optimizer kind (the optimizer updates each kind's rows as one view), then seed. A checkpoint
    holds "net" (the stacked weights and batch-norm statistics), "optimizer" (its step count and state slots),
    "generators" (each member's dropout generator, on the CPU) and "history" (one list per row); its identity
    (`identity()`) is the members still in, by params and seed in row order, and the pack's data seed: a pack
    resumes from it only when the same members come back, in whatever order they are given.
    """

    def __init__(self, net: StackedNet, order: list[int], members: Sequence[Member],
                 generators: list[torch.Generator] | None, device: torch.device, steps_per_epoch: int,
                 num_classes: int, data_seed: int) -> None:
        self.net, self.generators, self.device = net, generators, device
        self.steps_per_epoch, self.num_classes, self.data_seed = steps_per_epoch, num_classes, data_seed
        self.members = list(order)
        self.params = [members[i].params for i in order]
        self.seeds = [members[i].seed for i in order]
        self.optimizer = StackedOptimizer(net.parameters(), [p["optimizer"] for p in self.params],
                                          [float(p["weight_decay"]) for p in self.params],
                                          [float(p.get("momentum", 0.0)) for p in self.params])
        self._set_hyperparameters()

    def _set_hyperparameters(self) -> None:
        self.base_lr = torch.tensor([float(p["lr"]) for p in self.params], dtype=torch.float64, device=self.device)
        smoothing = [float(p["label_smoothing"]) if p["loss"] == "label_smoothing" else 0.0 for p in self.params]
        self.smoothing = torch.tensor(smoothing, device=self.device) if any(smoothing) else None

    def learning_rates(self, epoch: int) -> torch.Tensor:
        """[steps, K] float64: each member's rate at each step of `epoch`, base rate x its schedule's factor."""
        steps = self.steps_per_epoch
        factors = [[lr_factor(p, step, steps) for p in self.params]
                   for step in range((epoch - 1) * steps, epoch * steps)]
        return torch.tensor(factors, dtype=torch.float64).to(self.device, non_blocking=True) * self.base_lr

    def train_epoch(self, epoch: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    on_batch: Callable[[], None] | None) -> tuple[list[float], list[float]]:
        return self.train_steps(batches, self.learning_rates(epoch), on_batch)

    def train_steps(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], learning_rates: torch.Tensor,
                    on_batch: Callable[[], None] | None = None, max_steps: int | None = None
                    ) -> tuple[list[float], list[float]]:
        """Optimizer steps over `batches` at `learning_rates` [steps, K] (the first `max_steps` only, if given);
        each member's (mean training loss, training accuracy), read once. The first batch's logits are checked to
        be [batch, classes] for each member (`check_outputs`)."""
        self.net.train()
        k = len(self.members)
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        count = 0
        for step, (x, y) in enumerate(batches):
            with autocast(self.device):
                logits = self.net(x)
                if step == 0:
                    check_outputs(logits[0], len(y), self.num_classes, "each pack member")
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

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        return {name: tensor.cpu() for name, tensor in self.net.member_state_dict(row).items()}

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with these rows only; the others have left."""
        if not rows:
            self.members, self.params, self.seeds = [], [], []
            return
        self.net.keep(rows)
        self.optimizer.keep(rows)
        self.members = [self.members[r] for r in rows]
        self.params = [self.params[r] for r in rows]
        self.seeds = [self.seeds[r] for r in rows]
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows]
        self._set_hyperparameters()

    def identity(self) -> dict[str, Any]:
        return {"members": [{"params": params, "seed": seed} for params, seed in zip(self.params, self.seeds)],
                "data_seed": self.data_seed}

    def state_dict(self, histories: list[list[EpochMetrics]]) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generators": [g.get_state() for g in self.generators] if self.generators is not None else None,
                "history": [[metrics.as_dict() for metrics in history] for history in histories]}

    def load_state_dict(self, state: dict[str, Any]) -> list[list[EpochMetrics]]:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(self.generators or [], state["generators"] or [], strict=True):
            generator.set_state(saved)
        return [[EpochMetrics(**row) for row in history] for history in state["history"]]


def build_pack(family: Family, members: Sequence[Member], parts: dict[str, ImageSet], config: DataConfig,
               device: torch.device, data_seed: int,
               on_start: Callable[[nn.Module, BatchSource], None] | None = None) -> tuple[StackedLearner, BatchSource]:
    """The stacked members, each built as its solo trial is, and the one batch stream that feeds them;
    `on_start` sees the first row's network (every member's has its shapes) and the stream."""
    order = sorted(range(len(members)), key=lambda i: (KINDS.index(members[i].params["optimizer"]), members[i].seed))
    models, generators = [], []
    for i in order:
        models.append(build_model(family, members[i].params, parts, config, device, members[i].seed))
        generators.append(torch.Generator().set_state(torch.get_rng_state()))  # where its solo dropout starts
    _, source = batch_source(models[0], members[order[0]].params, parts, config, device, data_seed)
    if on_start is not None:
        on_start(models[0], source)
    trained = [model.head if uses_feature_cache(model) else model for model in models]
    # On the CPU each member draws its dropout masks as its solo run does; on a GPU one draw serves all
    # (solo runs there use a fused kernel whose masks a pack does not reproduce).
    own_generators = generators if device.type == "cpu" else None
    net = StackedNet.of(trained, own_generators)
    learner = StackedLearner(net, order, members, own_generators, device, source.num_batches(),
                             len(parts["train"].classes), data_seed)
    return learner, source


def run_pack(
    family: Family,
    members: Sequence[Member],
    parts: dict[str, ImageSet],
    config: DataConfig,
    device: torch.device,
    data_seed: int,
    *,
    on_batch: Callable[[], None] | None = None,
    on_start: Callable[[nn.Module, BatchSource], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[MemberResult]:
    """Train `members` as one pack on parts["train"], validating each on parts["val"] after every epoch.

    Returns one result per member, in the order given: see `search.trial.train_members`, the loop it runs,
    for when members leave and what their results hold, and `StackedLearner` for what `checkpoint` holds.
    Raises ValueError when the members do not share the family's shared parameters or the device computes in
    fp16, and `models.stacked.NotStackable` when the family's network cannot be stacked.
    """
    check_pack(family, members)
    if autocast_dtype(device) == torch.float16:
        raise ValueError(f"{device} computes in fp16, whose loss scaling would skip every member's step when one "
                         "member overflows; trial packs run in bf16 or fp32")
    learner, source = build_pack(family, members, parts, config, device, data_seed, on_start)
    return train_members(learner, source, members, int(members[0].params["epochs"]), run_conditions(device, parts),
                         checkpoint=checkpoint, on_batch=on_batch)


__all__ = ["Member", "MemberResult", "StackedLearner", "build_pack", "check_pack", "member_losses", "run_pack"]
