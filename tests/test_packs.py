"""Trial packs (search/pack, models/stacked.py): K trials of one shape trained as one stacked model.

Each member must be the trial it would be alone: stacked layers equal the solo layers, the stacked optimizer
equals torch.optim member by member, a member trained in a pack follows its solo run, and members leave a
pack without disturbing the others.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from models.stacked import NotStackable, StackedNet
from search.family import get_family
from search.pack.optim import StackedOptimizer
from search.pack.runner import Member, check_pack, member_losses, run_pack
from search.pack.size import CPU_PACK_SIZE, CUDA_MAX_PACK, fit_pack_size, member_bytes, pack_size
from search.pipeline import DataConfig, load_parts
from search.training import Diverged, make_loss
from search.trial import run_trial

CPU = torch.device("cpu")


# --- the optimizer -------------------------------------------------------------------------------------

def _torch_optimizer(kind: str, params: list[torch.Tensor], lr: float, weight_decay: float, momentum: float):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@pytest.mark.parametrize("kinds", [("adam",) * 3, ("adamw",) * 3, ("sgd",) * 3, ("rmsprop",) * 3,
                                   ("adam", "adam", "adamw", "sgd", "rmsprop", "rmsprop")])
def test_stacked_optimizer_equals_torch_optim_member_by_member(kinds: tuple[str, ...]) -> None:
    """Same gradients, per-member lr (changing every step, as a schedule does), weight decay and momentum:
    every member's parameters stay within 1e-6 relative of torch.optim's over 8 steps."""
    k, steps = len(kinds), 8
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (7,), (3, 2, 3, 3)]
    solo = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(k)]
    lrs = [10 ** (-3 + 0.5 * i / k) for i in range(k)]
    decays = [0.0 if i == 1 else 10 ** (-4 + i / k) for i in range(k)]  # one member without decay
    momenta = [0.5 + 0.4 * i / k for i in range(k)]
    stacked = [nn.Parameter(torch.stack([solo[m][j] for m in range(k)])) for j in range(len(shapes))]
    leaves = [[nn.Parameter(t.clone()) for t in member] for member in solo]
    optimizers = [_torch_optimizer(kind, leaves[m], lrs[m], decays[m], momenta[m]) for m, kind in enumerate(kinds)]
    pack = StackedOptimizer(stacked, kinds, decays, momenta)
    for step in range(steps):
        factors = [0.5 + 0.5 * ((step + m) % 3) for m in range(k)]  # a per-member schedule
        grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(k)]
        for m in range(k):
            for group in optimizers[m].param_groups:
                group["lr"] = lrs[m] * factors[m]
            for leaf, grad in zip(leaves[m], grads[m]):
                leaf.grad = grad.clone()
            optimizers[m].step()
        for j, param in enumerate(stacked):
            param.grad = torch.stack([grads[m][j] for m in range(k)])
        pack.step(torch.tensor(lrs, dtype=torch.float64) * torch.tensor(factors, dtype=torch.float64))
        for m in range(k):
            for j in range(len(shapes)):
                expected, got = leaves[m][j].detach(), stacked[j].detach()[m]
                assert not torch.equal(expected, solo[m][j])
                error = ((got - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
                assert error <= 1e-6, f"{kinds[m]} member {m}, parameter {j}, step {step}: relative error {error:.2e}"


# --- the stacked network -------------------------------------------------------------------------------


def _members(family: str, params: dict, seeds, **kwargs) -> tuple[list[nn.Module], list[torch.Generator]]:
    """Solo networks built as a trial builds them, and the global generator's state after each build."""
    nets, generators = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(get_family(family).create_model(params, **kwargs))
        generators.append(torch.Generator().set_state(torch.get_rng_state()))
    return nets, generators


SMALL = {
    "logreg": {},
    "mlp": {"n_layers": 3, "width_1": 32, "width_2": 24, "width_3": 16, "dropout_1": 0.2, "dropout_2": 0.0,
            "dropout_3": 0.5, "batch_norm": True},
    "cnn": {"n_conv": 2, "channels_1": 4, "channels_2": 6, "pool_1": 2, "pool_2": 2, "fc1": 16, "fc2": 8,
            "dropout": 0.3},
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_stacked_net_computes_every_members_own_network(family: str) -> None:
    """Train and eval outputs, dropout masks and batch-norm statistics of member k are its solo network's."""
    params = get_family(family).resolve(SMALL[family])
    nets, generators = _members(family, params, (3, 4, 5), image_size=16)
    states = [g.get_state() for g in generators]
    stacked = StackedNet.of(nets, generators)
    x = torch.randn(6, 3, 16, 16)
    for mode in (True, True, False):  # two training steps' forward passes, then evaluation
        stacked.train(mode)
        out = stacked(x)
        for k, net in enumerate(nets):
            torch.set_rng_state(states[k])  # the solo run's global generator
            expected = net.train(mode)(x)
            states[k] = torch.get_rng_state()
            assert torch.allclose(out[k], expected, rtol=1e-5, atol=1e-6), f"member {k}, train={mode}"
    for k, net in enumerate(nets):
        state = stacked.member_state_dict(k)
        assert state.keys() == net.state_dict().keys()
        for name, tensor in net.state_dict().items():
            assert torch.allclose(state[name].to(tensor.dtype), tensor, rtol=1e-5, atol=1e-6), name


def test_batch_norm_is_per_member() -> None:
    """Each member normalises with its own batch statistics and keeps its own running statistics."""
    params = get_family("mlp").resolve({**SMALL["mlp"], "dropout_1": 0.0, "dropout_3": 0.0})
    nets, _ = _members("mlp", params, (0, 1), image_size=8)
    stacked = StackedNet.of(nets).train()
    stacked(torch.randn(10, 3, 8, 8))
    name = next(n for n in nets[0].state_dict() if n.endswith("running_mean"))
    means = stacked.member_state_dict(0)[name], stacked.member_state_dict(1)[name]
    assert not torch.allclose(*means), "the members' features differ, so must their statistics"
    with torch.no_grad():  # member 0's batch norm weights: member 1's output must not move
        before = stacked.eval()(torch.ones(2, 3, 8, 8))[1].clone()
        norm = next(layer for layer in stacked.layers if hasattr(layer, "running_mean"))
        norm.weight[0].mul_(3.0)
        norm.running_mean[0].add_(1.0)
        after = stacked(torch.ones(2, 3, 8, 8))
    assert torch.equal(after[1], before)


def test_dropout_has_each_members_own_rate_and_randomness() -> None:
    """Rates 0, 0.5, 0.5, 0.9 drop those shares of each member's units; two members at one rate draw different
    masks; with or without per-member generators (the CPU's and the GPU's way)."""
    rates = (0.0, 0.5, 0.5, 0.9)
    nets = [nn.Sequential(nn.Linear(4, 4000), nn.Dropout(rate)) for rate in rates]
    for net in nets:
        nn.init.zeros_(net[0].weight)
        nn.init.ones_(net[0].bias)  # every unit is 1 before dropout
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(rates))]
    for stacked in (StackedNet.of(nets), StackedNet.of(nets, generators)):
        out = stacked.train()(torch.randn(50, 4))
        for k, rate in enumerate(rates):
            dropped = (out[k] == 0).float().mean().item()
            assert abs(dropped - rate) < 0.01, (k, rate, dropped)
            kept = out[k][out[k] != 0]
            assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - rate)))
        assert not torch.equal(out[1] == 0, out[2] == 0)
        assert torch.equal(stacked.eval()(torch.randn(5, 4)), torch.ones(len(rates), 5, 4000))


def test_keep_slices_members_out_of_every_tensor() -> None:
    params = get_family("cnn").resolve(SMALL["cnn"])
    nets, generators = _members("cnn", params, (0, 1, 2), image_size=16)
    stacked = StackedNet.of(nets, generators)
    parameters = list(stacked.parameters())
    states = [stacked.member_state_dict(k) for k in range(3)]
    stacked.keep([2, 0])
    assert stacked.members == 2 and list(stacked.parameters()) == parameters  # the same Parameter objects
    for row, k in enumerate((2, 0)):
        assert all(torch.equal(stacked.member_state_dict(row)[n], t) for n, t in states[k].items())
    x = torch.randn(3, 3, 16, 16)
    stacked.eval()
    out = stacked(x)
    for row, k in enumerate((2, 0)):
        assert torch.allclose(out[row], nets[k].eval()(x), rtol=1e-5, atol=1e-6)


def test_networks_that_cannot_be_stacked_are_refused() -> None:
    with pytest.raises(NotStackable, match="different numbers of layers"):
        StackedNet.of([nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 2), nn.ReLU())])
    with pytest.raises(NotStackable, match="one shape"):
        StackedNet.of([nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 4))])
    with pytest.raises(NotStackable, match="cannot be stacked"):
        StackedNet.of([nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))] * 2)
    with pytest.raises(NotStackable, match="Sequential"):
        StackedNet.of([get_family("mobilenet_finetune").create_model({}, weights="none")] * 2)


# --- losses ----------------------------------------------------------------------------------------------


def test_member_losses_are_each_members_own_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 10, generator=generator) * 4
    labels = torch.randint(0, 10, (16,), generator=generator)
    settings = [{"loss": "cross_entropy"}, {"loss": "nll"}, {"loss": "label_smoothing", "label_smoothing": 0.15}]
    smoothing = torch.tensor([0.0, 0.0, 0.15])
    losses = member_losses(logits, labels, smoothing)
    expected = torch.stack([make_loss(s)(logits[k], labels) for k, s in enumerate(settings)])
    assert torch.allclose(losses, expected, rtol=1e-6, atol=1e-6)
    plain = torch.stack([nn.functional.cross_entropy(logits[k], labels) for k in range(3)])
    assert torch.allclose(member_losses(logits, labels, None), plain, rtol=1e-6, atol=1e-6)


# --- the runner ------------------------------------------------------------------------------------------


def _tiny_members(family: str, variants: list[dict], **shared) -> list[Member]:
    base = {"epochs": 3, "batch_size": 8, **SMALL[family], **shared}
    return [Member(get_family(family).resolve({**base, **variant}), seed=20 + i) for i, variant in enumerate(variants)]


VARIED = [
    {"optimizer": "adam", "lr": 3e-3},
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine", "weight_decay": 1e-3},
    {"optimizer": "rmsprop", "lr": 1e-4, "momentum": 0.5, "loss": "label_smoothing", "label_smoothing": 0.1,
     "warmup_epochs": 1},
    {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-2, "lr_schedule": "onecycle", "loss": "nll"},
]


def _same_history(a: list, b: list, tolerance: float) -> bool:
    """The same epochs and accuracies, and losses within `tolerance` (relative)."""
    return len(a) == len(b) and all(
        x.epoch == y.epoch and x.train_accuracy == y.train_accuracy and x.val_accuracy == y.val_accuracy
        and math.isclose(x.train_loss, y.train_loss, rel_tol=tolerance)
        and math.isclose(x.val_loss, y.val_loss, rel_tol=tolerance)
        for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["logreg", "mlp", "cnn"])
def test_a_pack_of_one_is_the_solo_trial(tiny_config, family: str) -> None:
    """The one-runner property: a member alone in a pack trains as run_trial does (same seeds)."""
    parts = load_parts(tiny_config, 16)
    for member in _tiny_members(family, VARIED[1:3]):
        result, = run_pack(get_family(family), [member], parts, tiny_config, CPU, data_seed=5)
        solo = run_trial(get_family(family), member.params, parts, tiny_config, CPU, member.seed, data_seed=5)
        assert result.error is None
        assert _same_history(result.history, solo.history, 1e-5), (result.history, solo.history)
        for name, tensor in solo.trained.state_dict().items():  # last-bit differences, grown by training
            assert torch.allclose(result.state[name].to(tensor.dtype), tensor, rtol=1e-3, atol=1e-3), name


def test_data_seed_sets_batches_apart_from_initial_weights(tiny_config) -> None:
    parts = load_parts(tiny_config, 16)
    params = get_family("logreg").resolve({"epochs": 2, "batch_size": 8})
    histories = {data_seed: [dataclasses.replace(m, seconds=0.0) for m in run_trial(
        get_family("logreg"), params, parts, tiny_config, CPU, 3, data_seed=data_seed).history]
        for data_seed in (None, 3, 4)}
    assert histories[None] == histories[3]
    assert histories[3] != histories[4]


def test_members_must_share_the_shared_parameters(tiny_config) -> None:
    members = _tiny_members("logreg", [{}, {"batch_size": 16}])
    with pytest.raises(ValueError, match="batch_size"):
        check_pack(get_family("logreg"), members)
    finetune = get_family("mobilenet_finetune")
    with pytest.raises(ValueError, match="packs of one"):
        check_pack(finetune, [Member(finetune.resolve(), 0), Member(finetune.resolve(), 1)])


class Pruned(Exception):
    """Raised by a member's on_epoch, as the worker raises optuna.TrialPruned."""


@pytest.mark.parametrize("kinds", ["one optimizer", "mixed"])
def test_a_member_that_leaves_leaves_the_others_as_if_it_had_never_been_there(tiny_config, kinds: str) -> None:
    """Member 1 is pruned after epoch 1: members 0 and 2 end as a pack of them alone ends, weights, optimizer
    state and batch-norm statistics included (their own dropout masks keep their order too).

    Within float tolerance: an elementwise update over a run of rows rounds a few tail elements without fused
    multiply-add, and which elements those are depends on the rows beside a member; Adam magnifies such
    last-bit differences in parameters whose gradient is near zero. With one optimizer kind the runs are alike.
    """
    parts = load_parts(tiny_config, 16)

    def prune(metrics) -> None:
        raise Pruned(f"pruned at epoch {metrics.epoch}")

    members = _tiny_members("mlp", [VARIED[1]] * 3 if kinds == "one optimizer" else VARIED[:3])
    members[1].on_epoch = prune
    three = run_pack(get_family("mlp"), members, parts, tiny_config, CPU, data_seed=1)
    two = run_pack(get_family("mlp"), [members[0], members[2]], parts, tiny_config, CPU, data_seed=1)
    assert isinstance(three[1].error, Pruned) and [m.epoch for m in three[1].history] == [1]
    assert three[1].state is not None
    tolerance = 1e-6 if kinds == "one optimizer" else 1e-3
    for left, alone in zip((three[0], three[2]), two):
        assert left.error is None and alone.error is None and len(left.history) == 3
        assert _same_history(left.history, alone.history, tolerance)
        for name, tensor in alone.state.items():
            assert torch.allclose(left.state[name].to(tensor.dtype), tensor, rtol=tolerance, atol=tolerance / 10), name


def test_optimizer_state_of_members_that_stay_is_kept_exactly() -> None:
    """keep() slices every state slot: the stayers then step exactly as an optimizer that only ever had them."""
    kinds, decays, momenta = ("adam", "adam", "sgd", "rmsprop"), (1e-3, 0.0, 1e-3, 1e-4), (0.0, 0.0, 0.9, 0.5)
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(4, 6, 5, generator=generator)
    grads = [torch.randn(4, 6, 5, generator=generator) for _ in range(6)]
    lr = torch.tensor([1e-3, 2e-3, 1e-2, 1e-3], dtype=torch.float64)
    everyone, stayers = nn.Parameter(start.clone()), nn.Parameter(start[[0, 3]].clone())
    pack = StackedOptimizer([everyone], kinds, decays, momenta)
    alone = StackedOptimizer([stayers], [kinds[0], kinds[3]], [decays[0], decays[3]], [momenta[0], momenta[3]])
    for step, grad in enumerate(grads):
        if step == 3:
            everyone.data = everyone.data[[0, 3]].clone()
            pack.keep([0, 3])
        rows = [0, 3] if step >= 3 else [0, 1, 2, 3]
        everyone.grad = grad[rows].clone()
        pack.step(lr[rows])
        stayers.grad = grad[[0, 3]].clone()
        alone.step(lr[[0, 3]])
    assert torch.equal(everyone.data, stayers.data)
    assert all(torch.equal(a, b) for a, b in zip(pack.first + pack.second, alone.first + alone.second))


def test_a_diverged_member_leaves_and_the_others_go_on(tiny_config) -> None:
    parts = load_parts(tiny_config, 16)
    members = _tiny_members("logreg", VARIED[:3])
    members[1].params["lr"] = 1e30  # past the limits a search allows: this member's loss overflows at once
    results = run_pack(get_family("logreg"), members, parts, tiny_config, CPU, data_seed=0)
    assert isinstance(results[1].error, Diverged) and results[1].error.epoch == 1 and not results[1].history
    for result in (results[0], results[2]):
        assert result.error is None and len(result.history) == 3
        assert all(math.isfinite(m.train_loss) for m in result.history)


def test_a_pack_whose_members_all_leave_ends(tiny_config) -> None:
    parts = load_parts(tiny_config, 16)
    calls = []

    def leave_at_two(metrics) -> None:
        calls.append(metrics.epoch)
        if metrics.epoch == 2:
            raise Pruned("pruned")

    members = _tiny_members("logreg", VARIED[:2], epochs=5)
    for member in members:
        member.on_epoch = leave_at_two
    results = run_pack(get_family("logreg"), members, parts, tiny_config, CPU, data_seed=0)
    assert calls == [1, 1, 2, 2]
    assert all(isinstance(r.error, Pruned) and len(r.history) == 2 for r in results)


def test_a_failed_step_ends_every_member_still_in_the_pack_with_its_error(tiny_config, monkeypatch) -> None:
    parts = load_parts(tiny_config, 16)
    members = _tiny_members("logreg", VARIED[:2])
    steps = []
    real_step = StackedOptimizer.step

    def failing_step(self, lr):
        steps.append(1)
        if len(steps) > 5:  # in epoch 2: 4 steps per epoch
            raise RuntimeError("device lost")
        real_step(self, lr)

    monkeypatch.setattr(StackedOptimizer, "step", failing_step)
    results = run_pack(get_family("logreg"), members, parts, tiny_config, CPU, data_seed=0)
    assert all(isinstance(r.error, RuntimeError) and len(r.history) == 1 for r in results)


# --- a member equals its solo run on real images -------------------------------------------------------

CIFAR = "datasets/cifar10-stl10-sized"
SHARED_WEIGHTS = "weights/mobilenet_v2_imagenet_coral.pth"


@pytest.fixture(scope="session")
def cifar(shared_dir, tmp_path_factory):
    """cifar(size): the shared CIFAR folder at `size` px, cut to 1,000 train images (all 1,500 validation
    images), and a config for it with the shared MobileNetV2 weights."""
    root = shared_dir / CIFAR
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    weights = shared_dir / SHARED_WEIGHTS
    cache = tmp_path_factory.mktemp("cifar-cache")
    loaded = {}

    def load(size: int):
        if size not in loaded:
            config = DataConfig(dataset="imagefolder", data_root=root, image_size=size, cache_dir=cache,
                                weights=str(weights) if weights.is_file() else "none")
            parts = load_parts(config, size)
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(len(parts["train"]), generator=generator)[:1000].sort().values
            parts["train"] = parts["train"].subset(keep)
            loaded[size] = config, parts
        return loaded[size]

    return load


CIFAR_SHAPES = {
    "logreg": {},
    "mlp": {"n_layers": 3, "width_1": 256, "width_2": 128, "width_3": 64, "batch_norm": True},
    "cnn": {"n_conv": 3, "channels_1": 12, "channels_2": 12, "channels_3": 24, "pool_1": 2, "pool_2": 2, "pool_3": 2,
            "fc1": 64, "fc2": 32},
    "mobilenet_frozen": {"fc1": 128, "fc2": 64, "feature_views": 1, "image_size": 64},  # at 32px: chance
}
CIFAR_DROPOUT = ({}, {"dropout": 0.1, **{f"dropout_{i}": 0.1 for i in (1, 2, 3)}},
                 {"dropout": 0.3, **{f"dropout_{i}": (0.3, 0.0, 0.2)[i - 1] for i in (1, 2, 3)}}, {})


@pytest.mark.parametrize("family", sorted(CIFAR_SHAPES))
def test_a_member_trained_in_a_pack_follows_its_solo_run(cifar, family: str) -> None:
    """Four members (Adam, SGD, RMSprop, AdamW; schedules, losses, dropout) trained as one pack, then each alone
    with its seed and the pack's data seed: validation accuracy within 0.5 points after the first epoch and
    within 1 point at the last (the issue's tolerance for `best` reproducing a packed member).

    The CNN's grouped convolutions round differently from its solo convolutions in the last bits, and training
    can magnify that: with RMSprop at lr 1e-3 (its first steps move every weight by about 10 x lr), a solo run
    whose first layer's weights were perturbed by 1e-7 (relative) ends as far from itself as the packed member
    (3.6 points at epoch 3). The members here learn at rates where the CNN is not chaotic over three epochs.
    """
    spec = get_family(family)
    config, parts = cifar(CIFAR_SHAPES[family].get("image_size", 32))
    base = {"epochs": 3, "batch_size": 64, **CIFAR_SHAPES[family]}
    members = []
    for i, variant in enumerate(VARIED):
        dropout = {k: v for k, v in CIFAR_DROPOUT[i].items() if k in spec.pack_members}
        members.append(Member(spec.resolve({**base, **variant, **dropout}), seed=40 + i))
    results = run_pack(spec, members, parts, config, CPU, data_seed=9)
    for member, result in zip(members, results):
        assert result.error is None, result.error
        solo = run_trial(spec, member.params, parts, config, CPU, member.seed, data_seed=9).history
        packed = result.history
        differences = [abs(a.val_accuracy - b.val_accuracy) for a, b in zip(packed, solo)]
        print(f"{family} {member.params['optimizer']}: val accuracy {[round(m.val_accuracy, 4) for m in packed]}, "
              f"|pack - solo| {[round(d, 4) for d in differences]}")
        assert len(packed) == len(solo) == 3
        assert differences[0] <= 0.005 + 1e-9 and differences[-1] <= 0.01 + 1e-9, (member.params, packed, solo)


# --- which parameters a pack shares, and how many members it holds ----------------------------------------


def test_families_declare_what_pack_members_may_differ_in() -> None:
    for name in ("logreg", "mlp", "cnn", "mobilenet_frozen"):
        family = get_family(name)
        assert {"optimizer", "lr", "momentum", "weight_decay", "loss", "label_smoothing", "lr_schedule",
                "warmup_epochs"} <= set(family.pack_members)
        shared = family.pack_shared(family.resolve())
        assert {"batch_size", "epochs", "flip_p", "max_rotation", "translate", "cutout"} <= set(shared)
        assert not set(shared) & set(family.pack_members)
    assert {"dropout_1", "dropout_6"} <= set(get_family("mlp").pack_members)
    assert {"n_layers", "width_1", "batch_norm"} <= set(get_family("mlp").pack_shared(get_family("mlp").resolve()))
    assert {"feature_views", "head_input", "image_size", "fc1"} <= set(
        get_family("mobilenet_frozen").pack_shared(get_family("mobilenet_frozen").resolve()))
    assert get_family("mobilenet_finetune").pack_members == ()


def test_a_family_may_only_name_its_own_parameters_as_pack_members() -> None:
    from search.errors import UserError
    from search.family import Family
    from search.space import real

    with pytest.raises(UserError, match="pack_members names unknown parameters: lrr"):
        Family(name="x", title="x", build=lambda *a: None, space=[real("lr", 1e-3, 1e-1)], pack_members=("lrr",))


def test_pack_size_on_the_cpu() -> None:
    """The fine-tune and unstackable families train alone; on the CPU so do the MLP, the CNN and the frozen head,
    whose packs measured 0.94-1.08x of solo trials there (bench/trial_packs.py); logreg packs (4.3x)."""
    from search.family import Family

    assert pack_size(get_family("mobilenet_finetune"), CPU) == 1
    assert pack_size(get_family("logreg"), CPU) == CPU_PACK_SIZE > 1
    for name in ("mlp", "cnn", "mobilenet_frozen"):
        assert pack_size(get_family(name), CPU) == 1, name
    logreg = get_family("logreg")
    unstackable = Family(name="own", title="own", space=logreg.space, pack_members=logreg.pack_members,
                         build=lambda params, classes, size, weights: nn.Sequential(
                             nn.Flatten(), nn.Linear(3 * size * size, classes), nn.LayerNorm(classes)))
    assert pack_size(unstackable, CPU) == 1


def test_pack_size_fills_a_share_of_free_memory() -> None:
    gib = 2**30
    assert fit_pack_size(40 * gib, 2 * gib, 1 * gib, share=0.5, most=64) == 19  # 1 + (20 - 2) // 1
    assert fit_pack_size(40 * gib, 2 * gib, 1 * gib, share=0.5, most=16) == 16
    assert fit_pack_size(3 * gib, 2 * gib, 1 * gib, share=0.5, most=16) == 1  # even the first does not fit: 1
    assert fit_pack_size(10 * gib, 1 * gib, 3 * gib, share=0.5, most=16) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pack_on_a_gpu(tiny_config) -> None:
    """bf16 autocast, one dropout draw for all members: a pack trains, and its size is measured in memory."""
    cuda = torch.device("cuda")
    parts = {name: part.to(cuda) for name, part in load_parts(tiny_config, 16).items()}
    members = _tiny_members("mlp", VARIED)
    results = run_pack(get_family("mlp"), members, parts, tiny_config, cuda, data_seed=0)
    assert all(r.error is None and len(r.history) == 3 for r in results)
    first, each = member_bytes(get_family("mlp"), members[0].params, parts, tiny_config, cuda)
    assert first > 0 and each > 0
    assert 1 <= pack_size(get_family("mlp"), cuda, members[0].params, parts, tiny_config) <= CUDA_MAX_PACK


def test_packs_refuse_fp16_whose_loss_scaling_is_shared(tiny_config, monkeypatch) -> None:
    """fp16 (Volta, Turing) needs loss scaling, and one scale for all members would skip every member's step
    whenever one overflows: a pack refuses it, and the automatic size there is 1."""
    import search.pack.runner
    import search.pack.size

    monkeypatch.setattr(search.pack.runner, "autocast_dtype", lambda device: torch.float16)
    monkeypatch.setattr(search.pack.size, "autocast_dtype", lambda device: torch.float16)
    with pytest.raises(ValueError, match="fp16"):
        run_pack(get_family("logreg"), _tiny_members("logreg", VARIED[:2]), load_parts(tiny_config, 16), tiny_config,
                 CPU, data_seed=0)
    assert pack_size(get_family("logreg"), torch.device("cuda")) == 1
