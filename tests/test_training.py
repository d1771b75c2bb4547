"""search/training.py and the batch sources: losses, reproducibility, divergence, cached features, augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import search.features
import search.pipeline
from data import normalize
from models import build_model
from search.features import FeatureBatches
from search.pipeline import ImageBatches, fit, load_parts, prepare
from search.spaces import resolve_params
from search.training import Diverged, EpochMetrics, evaluate, make_loss, train

CPU = torch.device("cpu")


def _params(family: str, **overrides: object) -> dict:
    """The family's reference setting, shrunk to the tiny dataset: 2 epochs, batches of 8."""
    return resolve_params(family, {"epochs": 2, "batch_size": 8, **overrides})


def _frozen_params(**overrides: object) -> dict:
    return _params("mobilenet_frozen", fc1=16, fc2=8, feature_views=2, **overrides)


@pytest.fixture
def fresh_feature_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty in-process feature cache, so a test sees only the features it computed itself."""
    monkeypatch.setattr(search.features, "_MEMORY", {})


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
    parts = load_parts(tiny_config, "cnn")
    params = _params("cnn")
    runs = [fit("cnn", params, parts, tiny_config, CPU, seed=seed).history for seed in (3, 3, 4)]
    losses = [[(m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy) for m in run] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_on_epoch_sees_each_epoch_once_in_order(tiny_config) -> None:
    parts = load_parts(tiny_config, "cnn")
    seen: list[EpochMetrics] = []
    history = fit("cnn", _params("cnn", epochs=3), parts, tiny_config, CPU, on_epoch=seen.append).history
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert seen == history


def test_huge_learning_rate_raises_diverged(tiny_config) -> None:
    parts = load_parts(tiny_config, "cnn")
    params = _params("cnn", epochs=5, optimizer="sgd", lr=10.0, momentum=0.0)
    seen: list[int] = []
    with pytest.raises(Diverged) as caught:
        fit("cnn", params, parts, tiny_config, CPU, on_epoch=lambda m: seen.append(m.epoch))
    assert caught.value.epoch == len(seen) + 1  # the diverged epoch is not reported as a finished one
    assert "diverged" in str(caught.value)


def test_model_that_outputs_nan_raises_diverged_in_its_first_epoch(tiny_config) -> None:
    parts = load_parts(tiny_config, "cnn")
    params = _params("cnn")
    model, trained, source = prepare("cnn", params, parts, tiny_config, CPU, seed=0)
    model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(Diverged) as caught:
        train(trained, source, params, CPU)
    assert caught.value.epoch == 1


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


def test_head_on_backbone_features_is_the_whole_model() -> None:
    model = _frozen_mobilenet()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss_fn = make_loss({"loss": "cross_entropy"})
    with torch.inference_mode():
        x = normalize(images)
        whole = loss_fn(model(x), labels)
        head_only = loss_fn(model.head(model.backbone(x)), labels)
    assert torch.equal(whole, head_only)


def test_cached_feature_path_scores_like_the_image_path(
    tiny_config, fresh_feature_memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation of the head trained on cached features equals validating the whole model on images."""
    build = search.pipeline.build_model
    monkeypatch.setattr(search.pipeline, "build_model", lambda *a, **k: _fit_batch_norms(build(*a, **k)))
    parts = load_parts(tiny_config, "mobilenet_frozen")
    params = _frozen_params(lr=1e-2, epochs=6, dropout=0.0, weight_decay=0.0)
    result = fit("mobilenet_frozen", params, parts, tiny_config, CPU, seed=0)
    assert result.trained is result.model.head
    assert isinstance(result.source, FeatureBatches)
    on_features = result.evaluate("val", CPU)
    images = ImageBatches(parts, 8, flip_p=0.0, max_rotation=0.0, device=CPU, seed=0)
    on_images = evaluate(result.model, images.eval_batches("val"), make_loss(params), CPU)
    assert on_features.loss == pytest.approx(on_images.loss, rel=1e-5)
    assert torch.equal(on_features.predictions, on_images.predictions)
    assert len(set(on_images.predictions.tolist())) > 1  # the head learned something: a meaningful comparison
    assert on_features.accuracy == on_images.accuracy
    assert result.history[-1].val_loss == pytest.approx(on_images.loss, rel=1e-5)


def test_plain_eval_features_are_the_backbone_of_normalized_images(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, "mobilenet_frozen")
    model = _frozen_mobilenet()
    source = FeatureBatches(model.backbone, parts, 8, 2, 0.5, 8.0, CPU, 0, tiny_config.cache_dir)
    ((features, labels),) = list(source.eval_batches("val"))
    with torch.inference_mode():
        expected = model.backbone(normalize(parts["val"].images))
    _assert_close(features, expected)
    assert torch.equal(labels, parts["val"].labels)


def test_training_views_are_augmented_and_cycle_by_epoch(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, "mobilenet_frozen")
    backbone = _frozen_mobilenet().backbone
    source = FeatureBatches(backbone, parts, 8, 2, 0.5, 0.0, CPU, 0, None)  # flips only: exact, checkable views
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
    tiny_config, fresh_feature_memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = load_parts(tiny_config, "mobilenet_frozen")
    backbone = _frozen_mobilenet().backbone
    calls: list[int] = []
    compute = search.features.compute_features

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(search.features, "compute_features", counting)

    def build() -> FeatureBatches:
        return FeatureBatches(backbone, parts, 8, 2, 0.5, 8.0, CPU, 0, tiny_config.cache_dir)

    first = build()
    assert len(calls) == 3  # two training views and the validation part
    in_memory = build()
    monkeypatch.setattr(search.features, "_MEMORY", {})  # a new process: only the disk cache is left
    on_disk = build()
    assert len(calls) == 3
    for again in (in_memory, on_disk):
        assert all(torch.equal(a, b) for a, b in zip(first.views, again.views))
        assert torch.equal(first.eval_features["val"], again.eval_features["val"])
    assert len(list((tiny_config.cache_dir / "features").glob("*.pt"))) == 3


def test_other_backbone_weights_are_not_served_from_the_cache(tiny_config, fresh_feature_memory) -> None:
    parts = load_parts(tiny_config, "mobilenet_frozen")
    sources = [
        FeatureBatches(_frozen_mobilenet(seed).backbone, parts, 8, 1, 0.0, 0.0, CPU, 0, tiny_config.cache_dir)
        for seed in (0, 1)
    ]
    first, second = (source.eval_features["val"] for source in sources)
    assert not torch.allclose(first, second, rtol=1e-2, atol=1e-2)


# --- augmentation --------------------------------------------------------------------------------------


def test_augmentation_is_off_at_evaluation(tiny_config) -> None:
    parts = load_parts(tiny_config, "cnn")
    source = ImageBatches(parts, 8, flip_p=1.0, max_rotation=30.0, device=CPU, seed=0)
    first, second = (list(source.eval_batches("val")) for _ in range(2))
    assert len(first) == len(second) == 1
    assert torch.equal(first[0][0], second[0][0])
    assert torch.equal(first[0][0], normalize(parts["val"].images))
    assert torch.equal(first[0][1], parts["val"].labels)


def test_augmentation_is_on_in_training(tiny_config) -> None:
    parts = load_parts(tiny_config, "cnn")
    source = ImageBatches(parts, 64, flip_p=1.0, max_rotation=0.0, device=CPU, seed=0)
    (x, y), = list(source.train_batches(1))
    plain = normalize(parts["train"].images)
    order = [int(torch.nonzero(torch.all((plain.flip(-1) == image).flatten(1), dim=1))[0]) for image in x]
    assert sorted(order) == list(range(len(plain)))  # every image once, each one flipped
    assert torch.equal(y, parts["train"].labels[order])


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04 torn zip", id="torn"),
        pytest.param(b"not a tensor file at all", id="garbage"),
    ],
)
def test_corrupt_feature_cache_file_is_recomputed(
    tiny_config, fresh_feature_memory, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    parts = load_parts(tiny_config, "mobilenet_frozen")
    backbone = _frozen_mobilenet().backbone
    first = FeatureBatches(backbone, parts, 8, 1, 0.0, 0.0, CPU, 0, tiny_config.cache_dir)
    for path in (tiny_config.cache_dir / "features").glob("*.pt"):
        path.write_bytes(content)
    monkeypatch.setattr(search.features, "_MEMORY", {})
    again = FeatureBatches(backbone, parts, 8, 1, 0.0, 0.0, CPU, 0, tiny_config.cache_dir)
    assert torch.equal(first.eval_features["val"], again.eval_features["val"])
    assert torch.equal(first.views[0], again.views[0])
