"""search/training.py, search/trial.py and the batch sources: losses, schedules, the one trial runner
(reproducibility, divergence, checkpoints), cached features, augmentation."""

from __future__ import annotations

import dataclasses
import math
import os
import types

import pytest
import torch
from torch import nn

import search.features
import search.training
import search.trial
from data import normalize
from search.family import get_family
from search.features import MEMORY_SHARE, FeatureBatches, FeatureMemory, device_memory
from search.pipeline import Augmentation, ImageBatches, PinnedStaging, load_parts
from search.training import (Diverged, EpochMetrics, autocast_dtype, evaluate, lr_factor, make_loss, make_optimizer,
                             make_scaler)
from search.trial import Checkpoint, Interrupted, prepare, run_trial

CPU = torch.device("cpu")


def _params(family: str, **overrides: object) -> dict:
    """The family's reference setting, shrunk to the tiny dataset: 2 epochs, batches of 8."""
    return get_family(family).resolve({"epochs": 2, "batch_size": 8, **overrides})


def fit(family: str, params: dict, parts: dict, config, device, seed: int = 0, **kwargs):
    return run_trial(get_family(family), params, parts, config, device, seed, **kwargs)


def build_model(family: str, params: dict, **kwargs) -> nn.Module:
    return get_family(family).create_model(params, **kwargs)


def _frozen_params(**overrides: object) -> dict:
    return _params("mobilenet_frozen", fc1=16, fc2=8, feature_views=2, **overrides)


@pytest.fixture
def fresh_feature_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty in-process feature cache, so a test sees only the features it computed itself."""
    monkeypatch.setattr(search.features, "MEMORY", FeatureMemory())


# --- losses --------------------------------------------------------------------------------------------


def test_nll_over_log_softmax_equals_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator) * 5
    labels = torch.randint(0, 10, (64,), generator=generator)
    nll = make_loss({"loss": "nll"})(logits, labels)
    cross_entropy = make_loss({"loss": "cross_entropy"})(logits, labels)
    assert torch.allclose(nll, cross_entropy, rtol=1e-6, atol=1e-6)
    assert torch.allclose(cross_entropy, nn.functional.cross_entropy(logits, labels))


def test_label_smoothing_differs_from_plain_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator) * 5
    labels = torch.randint(0, 10, (64,), generator=generator)
    smoothed = make_loss({"loss": "label_smoothing", "label_smoothing": 0.1})(logits, labels)
    plain = make_loss({"loss": "cross_entropy", "label_smoothing": 0.1})(logits, labels)  # ignored unless chosen
    assert torch.allclose(smoothed, nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.allclose(plain, nn.functional.cross_entropy(logits, labels))
    assert not torch.allclose(smoothed, plain)


# --- the loop ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_histories_on_cpu(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("cnn")
    runs = [fit("cnn", params, parts, tiny_config, CPU, seed=seed).history for seed in (3, 3, 4)]
    losses = [[(m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy) for m in run] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_on_epoch_sees_each_epoch_once_in_order(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    seen: list[EpochMetrics] = []
    history = fit("cnn", _params("cnn", epochs=3), parts, tiny_config, CPU, on_epoch=seen.append).history
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert seen == history


def test_huge_learning_rate_raises_diverged(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("cnn", epochs=5, optimizer="sgd", lr=10.0, momentum=0.0)
    seen: list[int] = []
    with pytest.raises(Diverged) as caught:
        fit("cnn", params, parts, tiny_config, CPU, on_epoch=lambda m: seen.append(m.epoch))
    assert caught.value.epoch == len(seen) + 1  # the diverged epoch is not reported as a finished one
    assert "diverged" in str(caught.value)


def test_model_that_outputs_nan_raises_diverged_in_its_first_epoch(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("cnn")
    prepared = prepare(get_family("cnn"), params, parts, tiny_config, CPU, seed=0)
    prepared[0].register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(Diverged) as caught:
        fit("cnn", params, parts, tiny_config, CPU, prepared=prepared)
    assert caught.value.epoch == 1


# --- learning-rate schedules ------------------------------------------------------------------------------


def _factors(schedule: str, epochs: int = 10, warmup: int = 0, steps: int = 10) -> list[float]:
    params = {"lr_schedule": schedule, "epochs": epochs, "warmup_epochs": warmup}
    return [lr_factor(params, step, steps) for step in range(epochs * steps)]


def test_constant_schedule_keeps_the_rate_after_a_linear_warm_up() -> None:
    factors = _factors("constant", warmup=2)
    assert factors[:20] == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert set(factors[20:]) == {1.0}


def test_cosine_schedule_falls_from_the_peak_to_zero_over_the_epoch_budget() -> None:
    factors = _factors("cosine", warmup=1)
    assert factors[9] == 1.0 and max(factors) == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.001
    assert factors[10 + 45] == pytest.approx(0.5, abs=0.02)  # half way down after half the decay


def test_onecycle_rises_over_a_quarter_of_the_steps_then_falls_linearly_to_zero() -> None:
    factors = _factors("onecycle")
    peak = factors.index(max(factors))
    assert peak == 24 and factors[peak] == 1.0
    assert factors[0] < 0.05 and factors[-1] < 0.02
    assert all(a > b for a, b in zip(factors[peak + 1:], factors[peak + 2:]))


def test_the_optimizer_follows_the_schedule_step_by_step(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3, lr=0.01, lr_schedule="cosine", warmup_epochs=1)
    rates: list[float] = []
    family = get_family("logreg")
    model, trained, source = prepare(family, params, parts, tiny_config, CPU, 0)
    original = source.train_batches

    def spying(epoch: int):
        for batch in original(epoch):
            yield batch
            rates.append(optimizer_of[0].param_groups[0]["lr"])

    source.train_batches = spying
    optimizer_of: list = []
    import search.trial

    make = search.trial.make_optimizer

    def keep(*args):
        optimizer_of.append(make(*args))
        return optimizer_of[0]

    search.trial.make_optimizer = keep
    try:
        run_trial(family, params, parts, tiny_config, CPU, 0, prepared=(model, trained, source))
    finally:
        search.trial.make_optimizer = make
    steps = source.num_batches()
    expected = [0.01 * lr_factor(params, step, steps) for step in range(1, 3 * steps + 1)]
    assert rates[:-1] == pytest.approx(expected[:-1])  # the rate set for the step after each one
    assert rates[steps - 1] == pytest.approx(0.01)  # the peak right after the warm-up epoch


# --- the one trial runner: stop_after and checkpoints ----------------------------------------------------


def test_stopping_at_an_earlier_epoch_reproduces_the_same_epochs_of_the_full_run(tiny_config) -> None:
    """`best` retrains up to the best epoch on the trial's own schedule, so its epochs equal the trial's."""
    parts = load_parts(tiny_config, 32)
    params = _params("cnn", epochs=4, lr_schedule="cosine")
    full = fit("cnn", params, parts, tiny_config, CPU, seed=1).history
    short = fit("cnn", params, parts, tiny_config, CPU, seed=1, stop_after=2).history
    assert short == [dataclasses.replace(m, seconds=s.seconds) for m, s in zip(full[:2], short)]


class _StopAfter(Exception):
    pass


def _interrupt_at(epoch: int):
    def on_epoch(metrics: EpochMetrics) -> None:
        if metrics.epoch == epoch:
            raise Interrupted(f"stopped after epoch {epoch}")

    return on_epoch


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tiny_config, tmp_path) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=4, flip_p=0.0, max_rotation=0.0, lr_schedule="cosine")
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"study": "s1", "trial": 0, "params": params, "seed": 5})
    whole = fit("logreg", params, parts, tiny_config, CPU, seed=5).history
    with pytest.raises(Interrupted):
        fit("logreg", params, parts, tiny_config, CPU, seed=5, checkpoint=checkpoint, on_epoch=_interrupt_at(2))
    assert checkpoint.path.is_file()
    seen: list[int] = []
    resumed = fit("logreg", params, parts, tiny_config, CPU, seed=5, checkpoint=checkpoint,
                  on_epoch=lambda m: seen.append(m.epoch)).history
    assert seen == [1, 2, 3, 4]  # the restored epochs are reported again, then the new ones
    assert [m.val_accuracy for m in resumed[:2]] == [m.val_accuracy for m in whole[:2]]
    assert [m.train_loss for m in resumed] == pytest.approx([m.train_loss for m in whole], rel=1e-4)
    assert not checkpoint.path.exists()  # deleted once the run is over


@pytest.mark.parametrize("changed", ["study", "trial", "params", "seed"])
def test_a_checkpoint_made_by_another_run_is_deleted_not_resumed(tiny_config, tmp_path, changed: str) -> None:
    """The old bug: a new study reused trial-<n>.pt of a deleted one and stored its result without training."""
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3)
    identity = {"study": "old", "trial": 0, "params": params, "seed": 0}
    old = Checkpoint(tmp_path / "trial-0.pt", identity)
    with pytest.raises(Interrupted):
        fit("logreg", params, parts, tiny_config, CPU, checkpoint=old, on_epoch=_interrupt_at(2))
    other = {"study": "new", "trial": 1, "params": {**params, "lr": 0.5}, "seed": 9}
    new = Checkpoint(old.path, {**identity, changed: other[changed]})
    seen: list[int] = []
    history = fit("logreg", params, parts, tiny_config, CPU, checkpoint=new, on_epoch=lambda m: seen.append(m.epoch)
                  ).history
    assert seen == [1, 2, 3] and len(history) == 3  # trained from the first epoch
    assert not old.path.exists()


def test_a_run_that_fails_deletes_its_checkpoint(tiny_config, tmp_path) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3)
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})

    def prune_at_two(metrics: EpochMetrics) -> None:
        if metrics.epoch == 2:
            raise _StopAfter("pruned")

    with pytest.raises(_StopAfter):
        fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint, on_epoch=prune_at_two)
    assert not checkpoint.path.exists()


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_run(tiny_config, tmp_path, caplog) -> None:
    parts = load_parts(tiny_config, 32)
    blocked = tmp_path / "a-file"
    blocked.write_text("the checkpoint folder would have to be inside this file")
    checkpoint = Checkpoint(blocked / "trial-0.pt", {"trial": 0})
    history = fit("logreg", _params("logreg", epochs=3), parts, tiny_config, CPU, checkpoint=checkpoint).history
    assert len(history) == 3 and "could not write checkpoint" in caplog.text


def test_an_unreadable_checkpoint_means_starting_over(tiny_config, tmp_path) -> None:
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=2)
    path = tmp_path / "trial-0.pt"
    path.write_bytes(b"not a checkpoint")
    history = fit("logreg", params, parts, tiny_config, CPU, checkpoint=Checkpoint(path, {"trial": 0})).history
    assert [m.epoch for m in history] == [1, 2] and all(math.isfinite(m.train_loss) for m in history)


def test_a_checkpoint_is_read_to_the_cpu_and_a_resumed_adam_keeps_its_step_counts_there(tiny_config, tmp_path) -> None:
    """Read with map_location=<the run's device>, a CUDA run's Adam step counts landed on the GPU, where foreach
    Adam reads each one back to the host every step; on a box without CUDA the file could not even be read, and
    was deleted. Read to the CPU, `load_state_dict` moves the moments to the parameters (here on the meta device,
    standing in for a GPU) and leaves the step counts on the CPU."""
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3, optimizer="adam")
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})
    with pytest.raises(Interrupted):
        fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint, on_epoch=_interrupt_at(1))
    on_a_gpu = {"numerics": "cuda-bf16", "images": "cuda"}
    saved = torch.load(checkpoint.path, weights_only=True)
    checkpoint.save({key: value for key, value in saved.items() if key != "identity"}, on_a_gpu)
    state = checkpoint.load(on_a_gpu)
    assert state is not None and checkpoint.path.is_file()
    model = build_model("logreg", params, num_classes=4, image_size=32).to("meta")
    optimizer = make_optimizer(model, params)
    optimizer.load_state_dict(state["optimizer"])
    states = list(optimizer.state.values())
    assert states and all(s["step"].device == CPU for s in states)
    assert all(s[moment].device.type == "meta" for s in states for moment in ("exp_avg", "exp_avg_sq"))


def _as_if_made_on_a_gpu(path) -> None:
    """Give a checkpoint's random states the shape a CUDA generator's have (16 bytes), as a CUDA run leaves them."""
    state = torch.load(path, weights_only=True)
    state["source"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    state["source"]["sampler"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, path)


def test_a_checkpoint_made_on_another_kind_of_device_starts_over_with_a_warning(tiny_config, tmp_path, monkeypatch,
                                                                               caplog) -> None:
    """Its CUDA random states cannot seed CPU generators: resumed, the trial failed; now it is trained anew."""
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3)
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})
    with monkeypatch.context() as on_a_gpu:
        on_a_gpu.setattr(search.trial, "run_conditions", lambda device, parts: {"numerics": "cuda-bf16",
                                                                                "images": "cuda"}, raising=False)
        with pytest.raises(Interrupted):
            fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint, on_epoch=_interrupt_at(2))
    _as_if_made_on_a_gpu(checkpoint.path)
    seen: list[int] = []
    fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint, on_epoch=lambda m: seen.append(m.epoch))
    assert seen == [1, 2, 3] and checkpoint.restored_epochs == 0
    assert "cuda-bf16" in caplog.text and "cpu-fp32" in caplog.text and "starting over" in caplog.text


def test_a_checkpoint_whose_batch_state_the_source_cannot_take_starts_over_with_a_warning(tiny_config, tmp_path,
                                                                                          caplog) -> None:
    """Started over means from the run's first state: the same epochs as a run that never saw the file."""
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=3)
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})
    with pytest.raises(Interrupted):
        fit("logreg", params, parts, tiny_config, CPU, seed=2, checkpoint=checkpoint, on_epoch=_interrupt_at(2))
    _as_if_made_on_a_gpu(checkpoint.path)
    history = fit("logreg", params, parts, tiny_config, CPU, seed=2, checkpoint=checkpoint).history
    fresh = fit("logreg", params, parts, tiny_config, CPU, seed=2).history
    assert checkpoint.restored_epochs == 0 and not checkpoint.path.exists()
    assert [(m.train_loss, m.val_accuracy) for m in history] == [(m.train_loss, m.val_accuracy) for m in fresh]
    assert "starting over" in caplog.text


# --- numerics: mixed precision by device -----------------------------------------------------------------


@pytest.mark.parametrize("capability, dtype, name", [
    ((9, 0), torch.bfloat16, "cuda-bf16"),  # H100
    ((8, 0), torch.bfloat16, "cuda-bf16"),  # A100
    ((7, 5), torch.float16, "cuda-fp16"),  # T4
    ((7, 0), torch.float16, "cuda-fp16"),  # V100
    ((6, 0), None, "cuda-fp32"),  # P100: no tensor cores
])
def test_bf16_only_where_the_gpu_runs_it_natively_else_fp16_with_a_scaler(monkeypatch, capability, dtype, name) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else an enabled GradScaler disables itself
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda) == dtype
    assert search.features.numerics(cuda) == name  # the feature cache's key: fp16 features are not bf16 ones
    assert make_scaler(cuda).is_enabled() == (dtype == torch.float16)
    assert autocast_dtype(CPU) is None and search.features.numerics(CPU) == "cpu-fp32"
    assert not make_scaler(CPU).is_enabled()


def test_an_fp16_run_trains_through_a_grad_scaler_whose_state_is_checkpointed(tiny_config, tmp_path,
                                                                              monkeypatch) -> None:
    """fp16 autocast with loss scaling, as on a V100 or a T4, run on the CPU (it has both)."""
    monkeypatch.setattr(search.training, "autocast_dtype", lambda device: torch.float16)
    scalers: list = []
    make = search.trial.make_scaler
    monkeypatch.setattr(search.trial, "make_scaler", lambda device: scalers.append(make(device)) or scalers[-1])
    parts = load_parts(tiny_config, 32)
    params = _params("logreg", epochs=4, lr=3e-3)
    dtypes: list = []
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})
    with pytest.raises(Interrupted):
        fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint, on_epoch=_interrupt_at(2),
            on_start=lambda model, source: model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype)))
    saved = torch.load(checkpoint.path, weights_only=True)["scaler"]
    assert scalers[0].is_enabled() and saved == scalers[0].state_dict() and saved["scale"] > 0
    assert set(dtypes) == {torch.float16}
    restored: list = []
    history = fit("logreg", params, parts, tiny_config, CPU, checkpoint=checkpoint,
                  on_epoch=lambda m: restored.append(scalers[-1].state_dict()) if m.epoch == 2 else None).history
    assert checkpoint.restored_epochs == 2 and restored == [saved]  # the scale goes on from where it was
    assert all(math.isfinite(m.train_loss) for m in history) and max(m.val_accuracy for m in history) > 0.5


# --- cached features of a frozen backbone --------------------------------------------------------------


def _frozen_mobilenet(seed: int = 0, **params: object) -> nn.Module:
    """A random-weight frozen MobileNetV2 whose batch-norm statistics are fitted to random images.

    Straight from its initializer the backbone's features are ~1e-9 (identity batch norms shrink every
    block), which would make any feature comparison pass; fitted statistics give features of order 1.
    """
    torch.manual_seed(seed)
    model = build_model("mobilenet_frozen", {"fc1": 16, "fc2": 8, **params}, num_classes=4, weights=None)
    return _fit_batch_norms(model)


def _fit_batch_norms(model: nn.Module) -> nn.Module:
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average of what it sees
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.backbone.train()(normalize(images))
    return model.eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    assert scale > 0.1
    assert (actual - expected).abs().max() <= 1e-4 * scale


def test_cached_feature_path_scores_like_the_image_path(
    tiny_config, fresh_feature_memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation of the head trained on cached features equals validating the whole model on images."""
    family = get_family("mobilenet_frozen")
    fitted = dataclasses.replace(family, build=lambda *args: _fit_batch_norms(family.build(*args)))
    parts = load_parts(tiny_config, 32)
    params = _frozen_params(lr=1e-2, epochs=6, dropout=0.0, weight_decay=0.0)
    result = run_trial(fitted, params, parts, tiny_config, CPU, 0)
    assert result.trained is result.model.head
    assert isinstance(result.source, FeatureBatches)
    on_features = result.evaluate("val", CPU)
    images = ImageBatches(parts, 8, Augmentation(flip_p=0.0, max_rotation=0.0), device=CPU, seed=0)
    on_images = evaluate(result.model.eval(), images.eval_batches("val"), make_loss(params), CPU)
    assert on_features.loss == pytest.approx(on_images.loss, rel=1e-5)
    assert torch.equal(on_features.predictions, on_images.predictions)
    assert len(set(on_images.predictions.tolist())) > 1  # the head learned something: a meaningful comparison
    assert on_features.accuracy == on_images.accuracy
    assert result.history[-1].val_loss == pytest.approx(on_images.loss, rel=1e-5)


def test_plain_eval_features_are_the_backbone_of_normalized_images(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, 32)
    model = _frozen_mobilenet()
    source = FeatureBatches(model.backbone, parts, 8, 2, Augmentation(0.5, 8.0), CPU, 0, tiny_config.cache_dir)
    ((features, labels, n_valid),) = list(source.eval_batches("val"))
    assert n_valid == len(parts["val"])
    with torch.inference_mode():
        expected = model.backbone(normalize(parts["val"].images))
    _assert_close(features, expected)
    assert torch.equal(labels, parts["val"].labels)


def test_training_views_are_augmented_and_cycle_by_epoch(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, 32)
    backbone = _frozen_mobilenet().backbone
    source = FeatureBatches(backbone, parts, 8, 2, Augmentation(0.5, 0.0), CPU, 0, None)  # flips only: exact, checkable views
    with torch.inference_mode():
        plain = backbone(normalize(parts["train"].images))
        flipped = backbone(normalize(parts["train"].images).flip(-1))
    for view in source.views:
        flips = [(v - f).abs().max() < (v - p).abs().max() for v, p, f in zip(view, plain, flipped)]
        assert 0 < sum(flips) < len(flips)  # about half the images flipped
        _assert_close(view, torch.where(torch.tensor(flips).view(-1, 1), flipped, plain))
    assert not torch.allclose(source.views[0], source.views[1])
    for epoch, view in [(1, 0), (2, 1), (3, 0)]:
        x = torch.cat([x for x, _ in source.train_batches(epoch)])
        _assert_close(x.sum(0), source.views[view].sum(0))  # shuffled, but the rows of view (epoch - 1) mod 2


def test_second_feature_source_reads_the_cache_instead_of_the_backbone(
    tiny_config, feature_computations, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = load_parts(tiny_config, 32)
    backbone = _frozen_mobilenet().backbone
    calls = feature_computations

    def build() -> FeatureBatches:
        return FeatureBatches(backbone, parts, 8, 2, Augmentation(0.5, 8.0), CPU, 0, tiny_config.cache_dir)

    first = build()
    assert len(calls) == 3  # two training views and the validation part
    in_memory = build()
    search.features.MEMORY.clear()  # a new process: only the disk cache is left
    on_disk = build()
    assert len(calls) == 3
    for again in (in_memory, on_disk):
        assert all(torch.equal(a, b) for a, b in zip(first.views, again.views))
        assert torch.equal(first.eval_features["val"], again.eval_features["val"])
    assert len(list((tiny_config.cache_dir / "features").glob("*.pt"))) == 3


def test_other_backbone_weights_are_not_served_from_the_cache(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, 32)
    sources = [
        FeatureBatches(_frozen_mobilenet(seed).backbone, parts, 8, 1, Augmentation(0.0, 0.0), CPU, 0, tiny_config.cache_dir)
        for seed in (0, 1)
    ]
    first, second = (source.eval_features["val"] for source in sources)
    assert not torch.allclose(first, second, rtol=1e-2, atol=1e-2)


def test_the_feature_memory_keeps_the_most_recently_used_features_within_its_bytes() -> None:
    """It grew for the worker's life before: 18 MB per view of 3,500 images, on the GPU, never given back."""
    memory = FeatureMemory(capacity=3 * 400)  # three views of 100 float32 numbers
    views = {key: torch.full((100,), float(i)) for i, key in enumerate("abcd")}
    for key in "abc":
        memory.put(key, views[key])
    assert memory.get("a") is views["a"]  # now the most recently used
    memory.put("d", views["d"])
    assert memory.get("b") is None  # the least recently used went
    assert [memory.get(key) is views[key] for key in "acd"] == [True] * 3 and memory.nbytes == 1200
    memory.put("e", torch.zeros(2, 100))
    assert memory.get("a") is None and memory.get("c") is None and memory.nbytes == 1200  # d and e
    memory.put("too large", torch.zeros(301))
    assert memory.get("too large") is None and memory.nbytes == 1200  # not kept, and nothing went for it
    memory.clear()
    assert memory.nbytes == 0 and memory.get("e") is None


def test_the_feature_memory_holds_a_share_of_the_device_s_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FeatureMemory()
    memory.put("a", torch.zeros(10))
    assert memory.capacity == int(MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    sixteen_gb = types.SimpleNamespace(total_memory=16 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: sixteen_gb)
    assert device_memory(torch.device("cuda:0")) == 16 * 10**9


def test_a_feature_source_larger_than_the_memory_leaves_it_within_its_bytes(tiny_config, feature_computations,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    parts = load_parts(tiny_config, 32)
    view_bytes, val_bytes = (len(parts[name]) * 1280 * 4 for name in ("train", "val"))
    monkeypatch.setattr(search.features, "MEMORY", FeatureMemory(capacity=2 * view_bytes))
    source = FeatureBatches(_frozen_mobilenet().backbone, parts, 8, 3, Augmentation(0.5, 8.0), CPU, 0,
                            tiny_config.cache_dir)
    assert len(source.views) == 3 and len(feature_computations) == 4  # three training views and validation
    assert search.features.MEMORY.nbytes == view_bytes + val_bytes  # the last view and validation, put in last


# --- augmentation --------------------------------------------------------------------------------------


def test_augmentation_is_off_at_evaluation(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    source = ImageBatches(parts, 8, Augmentation(flip_p=1.0, max_rotation=30.0), device=CPU, seed=0)
    first, second = (list(source.eval_batches("val")) for _ in range(2))
    assert len(first) == len(second) == 1 and first[0][2] == len(parts["val"])
    assert torch.equal(first[0][0], second[0][0])
    assert torch.equal(first[0][0], normalize(parts["val"].images))
    assert torch.equal(first[0][1], parts["val"].labels)


def test_augmentation_is_on_in_training(tiny_config) -> None:
    parts = load_parts(tiny_config, 32)
    source = ImageBatches(parts, 64, Augmentation(flip_p=1.0, max_rotation=0.0), device=CPU, seed=0)
    (x, y), = list(source.train_batches(1))
    plain = normalize(parts["train"].images)
    order = [int(torch.nonzero(torch.all((plain.flip(-1) == image).flatten(1), dim=1))[0]) for image in x]
    assert sorted(order) == list(range(len(plain)))  # every image once, each one flipped
    assert torch.equal(y, parts["train"].labels[order])


def test_pinned_staging_reuses_two_sets_of_buffers_and_gathers_what_indexing_gathers(tiny_config) -> None:
    """Images kept in host memory (too many for the GPU): each training batch is gathered into one of two sets of
    buffers made once (pinned on CUDA), not into a new pageable tensor, whose non_blocking copy would block."""
    train = load_parts(tiny_config, 32)["train"]
    staging = PinnedStaging([train.images, train.labels], 8, CPU)
    buffers = [[buffer.data_ptr() for buffer in turn] for turn in staging.buffers]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for turn in range(6):
        index = torch.randperm(len(train), generator=generator)[:8]
        images, labels = staging.gather(index)
        assert torch.equal(staging.buffers[turn % 2][0], train.images[index])  # the sets take turns
        assert torch.equal(staging.buffers[turn % 2][1], train.labels[index])
        assert images.data_ptr() not in buffers[turn % 2]  # a batch of its own, on the device
        batches.append((images, labels, index))
    assert [[buffer.data_ptr() for buffer in turn] for turn in staging.buffers] == buffers
    for images, labels, index in batches:  # none overwritten by a later gather
        assert torch.equal(images, train.images[index]) and torch.equal(labels, train.labels[index])


def _shapes_seen(model: nn.Module) -> dict[str, set]:
    """Every input shape `model` sees, by mode: what cuDNN would tune a kernel for."""
    seen: dict[str, set] = {"train": set(), "eval": set()}
    model.register_forward_pre_hook(lambda m, inputs: seen["train" if m.training else "eval"].add(
        tuple(inputs[0].shape)))
    return seen


@pytest.mark.parametrize("family, params", [
    ("cnn", {"batch_size": 10}),  # 32 train images: 3 batches of 10 an epoch, the 2 left start the next epoch
    ("mobilenet_frozen", {"batch_size": 10, "fc1": 16, "fc2": 8, "feature_views": 2}),  # the head on features
])
def test_a_trial_feeds_its_model_one_training_shape_and_one_evaluation_shape(tiny_config, family, params,
                                                                             fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, 32)
    assert len(parts["train"]) % 10 != 0  # a short last batch would be a second shape
    entry = get_family(family)
    shapes: list[dict] = []
    run_trial(entry, entry.resolve({"epochs": 3, **params}), parts, tiny_config, CPU, 0,
              on_start=lambda model, source: shapes.append(_shapes_seen(source_module(model))))
    assert len(shapes[0]["train"]) == 1 and len(shapes[0]["eval"]) == 1
    (train_shape,) = shapes[0]["train"]
    assert train_shape[0] == 10


def source_module(model: nn.Module) -> nn.Module:
    """The module a run feeds: the head of a frozen backbone (it trains on cached features), else the model."""
    return model.head if getattr(model, "frozen", False) else model


def test_features_made_by_other_code_or_numerics_are_not_reused(tiny_config, fresh_feature_memory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    parts = load_parts(tiny_config, 32)
    backbone = _frozen_mobilenet().backbone
    FeatureBatches(backbone, parts, 8, 1, Augmentation(), CPU, 0, tiny_config.cache_dir)
    files = set((tiny_config.cache_dir / "features").glob("*.pt"))
    search.features.MEMORY.clear()
    monkeypatch.setattr(search.features, "FEATURES_VERSION", search.features.FEATURES_VERSION + 1)
    FeatureBatches(backbone, parts, 8, 1, Augmentation(), CPU, 0, tiny_config.cache_dir)
    assert len(set((tiny_config.cache_dir / "features").glob("*.pt")) - files) == 2  # computed anew, not read


def test_a_feature_cache_that_cannot_be_written_does_not_fail_the_trial(tiny_config, fresh_feature_memory,
                                                                        monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def disk_full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(search.features.torch, "save", disk_full)
    parts = load_parts(tiny_config, 32)
    source = FeatureBatches(_frozen_mobilenet().backbone, parts, 8, 1, Augmentation(), CPU, 0, tiny_config.cache_dir)
    assert source.eval_features["val"].shape == (len(parts["val"]), 1280)
    assert "pass a writable --cache-dir" in caplog.text
    assert not list((tiny_config.cache_dir / "features").glob("*.tmp"))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"features": [1, 2]}, id="not-a-tensor"),
        pytest.param(torch.zeros(3, 1280), id="other-images"),
        pytest.param(b"PK\x03\x04 torn zip", id="torn"),
        pytest.param(b"not a tensor file at all", id="garbage"),
    ],
)
def test_corrupt_feature_cache_file_is_recomputed(
    tiny_config, fresh_feature_memory, monkeypatch: pytest.MonkeyPatch, content: object
) -> None:
    parts = load_parts(tiny_config, 32)
    backbone = _frozen_mobilenet().backbone
    first = FeatureBatches(backbone, parts, 8, 1, Augmentation(0.0, 0.0), CPU, 0, tiny_config.cache_dir)
    for path in (tiny_config.cache_dir / "features").glob("*.pt"):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
    search.features.MEMORY.clear()
    again = FeatureBatches(backbone, parts, 8, 1, Augmentation(0.0, 0.0), CPU, 0, tiny_config.cache_dir)
    assert torch.equal(first.eval_features["val"], again.eval_features["val"])
    assert torch.equal(first.views[0], again.views[0])


def test_backbone_features_are_computed_in_batches_of_at_most_128_on_the_cpu() -> None:
    """On this CPU MobileNetV2 ran faster in batches of 128 than of 512; a GPU keeps 512."""
    from search.features import compute_features, feature_batch_size

    shapes: list[int] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(x.shape[0])
            return x.mean((2, 3))

    compute_features(Recorder(), torch.zeros(300, 3, 8, 8, dtype=torch.uint8), torch.device("cpu"))
    assert shapes == [100, 100, 100]  # 300 images in as few batches of at most 128, evened out
    assert feature_batch_size(torch.device("cuda")) == 512
