"""The one epoch loop (`search.trial.train_members`): a solo trial and a trial pack run through it, on their own
learners, and a pack checkpoints, stops and resumes per pack.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import search.trial
from search.errors import FamilyError
from search.family import Family, get_family
from search.pack.optim import StackedOptimizer
from search.pack.runner import Member, StackedLearner, run_pack
from search.pipeline import load_parts
from search.trial import Checkpoint, Interrupted, ModuleLearner, run_trial

CPU = torch.device("cpu")
MLP = {"n_layers": 2, "width_1": 32, "width_2": 16, "dropout_1": 0.3, "dropout_2": 0.1, "batch_norm": True,
       "epochs": 4, "batch_size": 8}
VARIED = [
    {"optimizer": "adam", "lr": 3e-3},
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine", "weight_decay": 1e-3},
    {"optimizer": "rmsprop", "lr": 1e-4, "momentum": 0.5, "loss": "label_smoothing", "label_smoothing": 0.1},
    {"optimizer": "adam", "lr": 1e-3, "dropout_1": 0.5, "lr_schedule": "onecycle"},
]


class Pruned(Exception):
    """Raised by a member's on_epoch, as the worker raises optuna.TrialPruned."""


def _members(**changes) -> list[Member]:
    family = get_family("mlp")
    return [Member(family.resolve({**MLP, **variant, **changes}), seed=30 + i) for i, variant in enumerate(VARIED)]


def _reporting(members: list[Member], seen: dict[int, list[int]], raise_at: dict[int, tuple[int, type]] | None = None
               ) -> list[Member]:
    """The members, each recording the epochs its on_epoch sees in seen[seed], and raising raise_at[seed]
    = (epoch, exception class) at that epoch."""

    def reporter(seed: int):
        def on_epoch(metrics) -> None:
            seen.setdefault(seed, []).append(metrics.epoch)
            epoch, error = (raise_at or {}).get(seed, (None, None))
            if metrics.epoch == epoch:
                raise error(f"member {seed} at epoch {epoch}")
        return on_epoch

    return [dataclasses.replace(member, on_epoch=reporter(member.seed)) for member in members]


def _curve(result) -> list:
    return [dataclasses.replace(metrics, seconds=0.0) for metrics in result.history]


def test_a_solo_trial_and_a_pack_run_through_the_same_epoch_loop(tiny_config, monkeypatch) -> None:
    parts = load_parts(tiny_config, 16)
    learners = []
    run = search.trial._EpochLoop.run

    def spy(self, *args, **kwargs):
        learners.append(type(self.learner))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(search.trial._EpochLoop, "run", spy)
    members = _members(epochs=1)
    run_trial(get_family("mlp"), members[0].params, parts, tiny_config, CPU, members[0].seed)
    run_pack(get_family("mlp"), members, parts, tiny_config, CPU, data_seed=0)
    assert learners == [ModuleLearner, StackedLearner]


def test_an_interrupted_pack_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(tiny_config, tmp_path) -> None:
    """Member 31 is pruned after epoch 1; the others are stopped after epoch 2. Given back in another order,
    the three come back from the file (weights, optimizer state, batch-norm statistics, dropout generators,
    batch order) and end exactly as a pack that was never stopped."""
    parts = load_parts(tiny_config, 16)
    family = get_family("mlp")
    pruned = {31: (1, Pruned)}
    seen: dict[int, list[int]] = {}
    whole = run_pack(family, _reporting(_members(), seen, pruned), parts, tiny_config, CPU, data_seed=3)
    assert seen == {30: [1, 2, 3, 4], 31: [1], 32: [1, 2, 3, 4], 33: [1, 2, 3, 4]}

    checkpoint = Checkpoint(tmp_path / "pack-0.pt", {"study": "s", "pack": 0})
    stop = {**pruned, **{seed: (2, Interrupted) for seed in (30, 32, 33)}}
    stopped = run_pack(family, _reporting(_members(), {}, stop), parts, tiny_config, CPU, data_seed=3,
                       checkpoint=checkpoint)
    assert isinstance(stopped[1].error, Pruned)
    assert all(isinstance(stopped[i].error, Interrupted) and len(stopped[i].history) == 2 for i in (0, 2, 3))
    assert checkpoint.path.is_file()

    seen = {}
    back = [m for m in _members() if m.seed != 31][::-1]
    resumed = run_pack(family, _reporting(back, seen), parts, tiny_config, CPU, data_seed=3, checkpoint=checkpoint)
    assert checkpoint.restored_epochs == 2 and not checkpoint.path.exists()
    assert seen == {seed: [1, 2, 3, 4] for seed in (30, 32, 33)}  # the restored epochs are reported again
    for result in resumed:
        alone = whole[result.member.seed - 30]
        assert result.error is None and _curve(result) == _curve(alone)
        assert all(torch.equal(result.state[name], tensor) for name, tensor in alone.state.items())


@pytest.mark.parametrize("other", ["fewer members", "another seed", "other params", "another data seed"])
def test_a_pack_checkpoint_is_resumed_only_by_the_same_members(tiny_config, tmp_path, other: str) -> None:
    parts = load_parts(tiny_config, 16)
    family = get_family("mlp")
    checkpoint = Checkpoint(tmp_path / "pack-0.pt", {"study": "s", "pack": 0})
    members = _members()[:3]
    run_pack(family, _reporting(members, {}, {m.seed: (2, Interrupted) for m in members}), parts, tiny_config, CPU,
             data_seed=3, checkpoint=checkpoint)
    assert checkpoint.path.is_file()
    data_seed = 4 if other == "another data seed" else 3
    if other == "fewer members":
        members = members[:2]
    elif other == "another seed":
        members = [members[0], dataclasses.replace(members[1], seed=99), members[2]]
    elif other == "other params":
        members = [members[0], dataclasses.replace(members[1], params={**members[1].params, "lr": 0.01}), members[2]]
    seen: dict[int, list[int]] = {}
    results = run_pack(family, _reporting(members, seen), parts, tiny_config, CPU, data_seed=data_seed,
                       checkpoint=checkpoint)
    assert checkpoint.restored_epochs == 0 and not checkpoint.path.exists()
    assert all(r.error is None for r in results) and all(epochs == [1, 2, 3, 4] for epochs in seen.values())


def test_a_pack_stopped_as_a_member_is_pruned_keeps_the_stopped_members_in_its_checkpoint(tiny_config,
                                                                                          tmp_path) -> None:
    """At epoch 2 member 30 is pruned and the others are stopped: the file holds the stopped ones, which resume."""
    parts = load_parts(tiny_config, 16)
    family = get_family("mlp")
    checkpoint = Checkpoint(tmp_path / "pack-0.pt", {"study": "s", "pack": 0})
    stop = {30: (2, Pruned), 31: (2, Interrupted), 32: (2, Interrupted)}
    results = run_pack(family, _reporting(_members()[:3], {}, stop), parts, tiny_config, CPU, data_seed=3,
                       checkpoint=checkpoint)
    assert [type(r.error) for r in results] == [Pruned, Interrupted, Interrupted]
    seen: dict[int, list[int]] = {}
    run_pack(family, _reporting(_members()[1:3], seen), parts, tiny_config, CPU, data_seed=3, checkpoint=checkpoint)
    assert checkpoint.restored_epochs == 2 and seen == {31: [1, 2, 3, 4], 32: [1, 2, 3, 4]}


def test_a_member_stopped_while_the_others_go_on_leaves_and_the_pack_deletes_its_checkpoint(tiny_config,
                                                                                           tmp_path) -> None:
    parts = load_parts(tiny_config, 16)
    checkpoint = Checkpoint(tmp_path / "pack-0.pt", {"study": "s", "pack": 0})
    results = run_pack(get_family("mlp"), _reporting(_members()[:2], {}, {30: (2, Interrupted)}), parts, tiny_config,
                       CPU, data_seed=3, checkpoint=checkpoint)
    assert isinstance(results[0].error, Interrupted) and len(results[0].history) == 2
    assert results[1].error is None and len(results[1].history) == 4
    assert not checkpoint.path.exists()


def test_a_pack_whose_network_outputs_the_wrong_shape_fails_every_member(tiny_config) -> None:
    """As a solo trial fails (`check_outputs`): 7 logits for 4 classes would train and report a meaningless
    accuracy."""
    parts = load_parts(tiny_config, 16)
    logreg = get_family("logreg")
    seven = Family(name="seven", title="seven", space=logreg.space, pack_members=logreg.pack_members,
                   build=lambda params, classes, size, weights: nn.Sequential(nn.Flatten(),
                                                                              nn.Linear(3 * size * size, 7)))
    members = [Member(seven.resolve({"epochs": 2, "batch_size": 8, "lr": lr}), seed=i)
               for i, lr in enumerate((1e-3, 2e-3))]
    results = run_pack(seven, members, parts, tiny_config, CPU, data_seed=0)
    assert all(isinstance(r.error, FamilyError) and "[8, 7]" in str(r.error) and not r.history for r in results)
    with pytest.raises(FamilyError, match=r"\[8, 7\]"):
        run_trial(seven, members[0].params, parts, tiny_config, CPU, 0)


def test_a_stacked_optimizer_loaded_from_another_steps_as_it_does() -> None:
    generator = torch.Generator().manual_seed(0)
    kinds, decays, momenta = ("adam", "sgd", "rmsprop"), (1e-3, 0.0, 1e-4), (0.0, 0.9, 0.5)
    start = torch.randn(3, 4, 5, generator=generator)
    grads = [torch.randn(3, 4, 5, generator=generator) for _ in range(5)]
    lr = torch.tensor([1e-3, 1e-2, 1e-3], dtype=torch.float64)
    first, second = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    one = StackedOptimizer([first], kinds, decays, momenta)
    for grad in grads[:3]:
        first.grad = grad.clone()
        one.step(lr)
    two = StackedOptimizer([second], kinds, decays, momenta)
    two.load_state_dict(one.state_dict())
    second.data.copy_(first.data)
    for grad in grads[3:]:
        first.grad, second.grad = grad.clone(), grad.clone()
        one.step(lr)
        two.step(lr)
    assert torch.equal(first.data, second.data)
    fewer = StackedOptimizer([nn.Parameter(start[:2].clone())], kinds[:2], decays[:2], momenta[:2])
    with pytest.raises(ValueError, match="other members"):
        fewer.load_state_dict(one.state_dict())
