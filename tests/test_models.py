"""models/: the study's parameter counts, frozen and fine-tuned MobileNetV2, parameter errors and weights loading."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import torchvision
from torch import nn

import models
from models import ParamError, WeightsError, count_trainable, format_layer_table, layer_rows
from search.errors import UserError
from search.family import get_family
from search.pipeline import Augmentation, ImageBatches, load_parts
from search.training import make_optimizer, parameter_groups
from search.trial import run_trial

CPU = torch.device("cpu")
SHARED_WEIGHTS = "weights/mobilenet_v2_imagenet_coral.pth"


def build_model(family: str, params: dict, **kwargs) -> nn.Module:
    """The family's network, its reference setting under `params`."""
    return get_family(family).create_model(params, **kwargs)


# --- the study's configurations -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_model() -> Iterator[Callable[[str], nn.Module]]:
    """family -> its defaults at the study's 64x64 inputs, each built once (the fully connected net has 28M weights)."""
    built: dict[str, nn.Module] = {}

    def get(family: str) -> nn.Module:
        if family not in built:
            built[family] = build_model(family, {}, image_size=64)
        return built[family]

    yield get
    built.clear()


@pytest.mark.parametrize(
    ("family", "count"),
    [("logreg", 122_890), ("mlp", 27_960_202), ("cnn", 162_064)],
)
def test_study_configurations_have_the_reported_trainable_parameter_counts(
    study_model: Callable[[str], nn.Module], family: str, count: int
) -> None:
    """SPEC.md's table, at the study's 64x64 inputs and 10 classes, with each family's defaults."""
    assert count_trainable(study_model(family)) == count


def test_defaults_are_the_study_architectures(study_model: Callable[[str], nn.Module]) -> None:
    mlp = study_model("mlp")
    widths = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert widths == [2048, 1024, 512, 256, 128, 10]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp.modules()) == 4  # every hidden block but the first
    cnn = study_model("cnn")
    assert [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [12, 12, 42]
    assert [m.kernel_size for m in cnn.modules() if isinstance(m, nn.MaxPool2d)] == [2, 2, 4]


@pytest.mark.parametrize("family", ["logreg", "mlp", "cnn"])
def test_layer_table_lists_every_linear_and_conv_layer(study_model: Callable[[str], nn.Module], family: str) -> None:
    model = study_model(family)
    weighted = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    rows = {row.name: row for row in layer_rows(model)}
    table = format_layer_table(model)
    lines = table.splitlines()
    for name, module in weighted:
        assert rows[name].kind == type(module).__name__
        assert rows[name].trainable == sum(p.numel() for p in module.parameters())
        assert any(line.split()[:2] == [name, type(module).__name__] for line in lines), name
    assert lines[-1].split()[:2] == ["total", f"{count_trainable(model):,}"]


# --- MobileNetV2, frozen and fine-tuned ----------------------------------------------------------------


def _batch_norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_mobilenet_has_no_trainable_backbone_parameter() -> None:
    model = build_model("mobilenet_frozen", {}, num_classes=4, weights=None)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert count_trainable(model) == count_trainable(model.head) > 0


def test_frozen_backbone_batch_norm_stays_in_eval_mode_during_training() -> None:
    model = build_model("mobilenet_frozen", {}, num_classes=4, weights=None)
    model.train()
    assert model.training and model.head.training
    assert not model.backbone.training
    assert not any(bn.training for bn in _batch_norms(model.backbone))


def test_training_a_frozen_mobilenet_changes_the_head_only(tiny_config) -> None:
    """One epoch of the shared loop on the whole model (images in, not cached features): backbone bit-identical."""
    parts = load_parts(tiny_config, 32)
    family = get_family("mobilenet_frozen")
    params = family.resolve({"epochs": 1, "batch_size": 16, "fc1": 16, "fc2": 8})
    torch.manual_seed(0)
    model = build_model("mobilenet_frozen", params, num_classes=4, weights=None)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    source = ImageBatches(parts, 16, Augmentation(flip_p=0.5, max_rotation=8.0), device=CPU, seed=0)
    run_trial(family, params, parts, tiny_config, CPU, 0, prepared=(model, model, source))
    backbone_after = model.backbone.state_dict()
    assert backbone_before.keys() == backbone_after.keys()
    for key, before in backbone_before.items():  # weights and batch-norm running statistics alike
        assert torch.equal(before, backbone_after[key]), key
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items())


def test_finetuned_backbone_learns_at_lr_times_backbone_lr_factor() -> None:
    model = build_model("mobilenet_finetune", {"backbone_lr_factor": 0.25}, num_classes=4, weights=None)
    assert all(p.requires_grad for p in model.parameters())
    groups = parameter_groups(model)
    head, backbone = groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert (head["lr_scale"], backbone["lr_scale"]) == (1.0, 0.25)

    optimizer = make_optimizer(model, {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0})
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(2e-3) for p in model.head.parameters())
    assert all(lr_of[id(p)] == pytest.approx(5e-4) for p in model.backbone.parameters())
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter trained, none twice


def test_finetuned_backbone_batch_norm_trains() -> None:
    model = build_model("mobilenet_finetune", {}, num_classes=4, weights=None).train()
    assert all(bn.training for bn in _batch_norms(model.backbone))


# --- bad hyperparameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "params", "name"),
    [
        ("cnn", {"dropout": 1.5}, "dropout"),
        ("cnn", {"n_conv": 7}, "n_conv"),
        ("cnn", {"kernel_size": 4}, "kernel_size"),
        ("cnn", {"pool_type": "median"}, "pool_type"),
        ("cnn", {"fc1": float("nan")}, "fc1"),
        ("mlp", {"width_2": 10.5}, "width_2"),
        ("mlp", {"width_1": "wide"}, "width_1"),
        ("mlp", {"width_1": 1e10}, "width_1"),  # would ask the allocator for 500 GB
        ("mlp", {"dropout_3": -0.1}, "dropout_3"),
        ("mobilenet_frozen", {"head_input": "pixels"}, "head_input"),
        ("mobilenet_finetune", {"backbone_lr_factor": -1}, "backbone_lr_factor"),
    ],
)
def test_bad_param_is_a_one_line_error_naming_it(family: str, params: dict, name: str) -> None:
    entry = get_family(family)
    with pytest.raises((UserError, ParamError), match=name) as caught:
        entry.create_model(entry.resolve(params), num_classes=4, image_size=32, weights=None)
    assert "\n" not in str(caught.value)


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        get_family("resnet")


# --- MobileNetV2 weights -------------------------------------------------------------------------------


def test_missing_weights_file_raises_weights_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pth"
    with pytest.raises(WeightsError, match=str(missing)):
        models.load_mobilenet_v2(missing)


def _save_wrong_checkpoints(folder: Path) -> dict[str, Path]:
    checkpoints = {
        "text file": "not a checkpoint at all",
        "empty file": "",
        "other state dict": {"weight": torch.zeros(3)},
        "state dict with other shapes": torchvision.models.mobilenet_v2(num_classes=4).state_dict(),
        "plain tensor": torch.zeros(3),
        "pickled module": nn.Linear(2, 2),
    }
    paths = {}
    for index, (name, content) in enumerate(checkpoints.items()):
        path = paths[name] = folder / f"{index}.pth"
        if isinstance(content, str):
            path.write_text(content)
        else:
            torch.save(content, path)
    return paths


def test_file_that_is_not_a_mobilenet_state_dict_raises_weights_error(tmp_path: Path) -> None:
    for name, path in _save_wrong_checkpoints(tmp_path).items():
        with pytest.raises(WeightsError, match="not a torchvision MobileNetV2 state dict") as caught:
            models.load_mobilenet_v2(path)
        assert str(path) in str(caught.value), name
        assert "\n" not in str(caught.value), name


def test_folder_given_as_weights_raises_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is not a file"):
        models.load_mobilenet_v2(tmp_path)


@pytest.mark.parametrize(
    "failure",
    [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), RuntimeError("invalid hash value")],
    ids=["offline", "bad download"],
)
def test_imagenet_weights_that_cannot_be_downloaded_raise_weights_error(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fail)
    with pytest.raises(WeightsError, match="--weights PATH"):
        models.load_mobilenet_v2("imagenet")


def test_shared_imagenet_weights_load(shared_dir: Path) -> None:
    path = shared_dir / SHARED_WEIGHTS
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    net = models.load_mobilenet_v2(path)
    expected = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(net.state_dict()["classifier.1.weight"], expected["classifier.1.weight"])
    model = build_model("mobilenet_frozen", {}, num_classes=4, weights=path)
    with torch.inference_mode():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
