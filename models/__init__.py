"""The five model families of the study, each built from a plain dict of hyperparameters.

Knows networks only: nothing here imports Optuna, storage or the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from models.cnn import CNN_DEFAULTS, build_cnn
from models.linear import LOGREG_DEFAULTS, MLP_DEFAULTS, MLP_PARAM_NAMES, build_logreg, build_mlp
from models.mobilenet import (
    FINETUNE_DEFAULTS,
    FROZEN_DEFAULTS,
    IMAGENET_WEIGHTS,
    MobileNetClassifier,
    WeightsError,
    build_mobilenet,
    load_mobilenet_v2,
)
from models.params import ParamError
from models.summary import count_trainable, format_layer_table, layer_rows


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    defaults: dict[str, Any]  # the study's hand-found architecture
    param_names: frozenset[str]  # every architecture key this family reads
    image_size: int  # input side in pixels unless the user sets another
    pretrained: bool  # takes MobileNetV2 weights


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("logreg", "logistic regression", LOGREG_DEFAULTS, frozenset(), 64, False),
        Family("mlp", "fully connected net", MLP_DEFAULTS, MLP_PARAM_NAMES, 64, False),
        Family("cnn", "CNN", CNN_DEFAULTS, frozenset(CNN_DEFAULTS), 64, False),
        Family("mobilenet_frozen", "frozen MobileNetV2", FROZEN_DEFAULTS, frozenset(FROZEN_DEFAULTS), 96, True),
        Family("mobilenet_finetune", "fine-tuned MobileNetV2", FINETUNE_DEFAULTS, frozenset(FINETUNE_DEFAULTS), 96, True),
    )
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logreg": lambda p, c, s, w: build_logreg(p, c, s),
    "mlp": lambda p, c, s, w: build_mlp(p, c, s),
    "cnn": lambda p, c, s, w: build_cnn(p, c, s),
    "mobilenet_frozen": lambda p, c, s, w: build_mobilenet(p, c, w, frozen=True),
    "mobilenet_finetune": lambda p, c, s, w: build_mobilenet(p, c, w, frozen=False),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ParamError(f"unknown model {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_model(
    family: str,
    params: dict[str, Any],
    *,
    num_classes: int = 10,
    image_size: int | None = None,
    weights: str | Path | None = None,
) -> nn.Module:
    """The network of `family` from `params` (missing keys take the family's defaults; other keys are ignored)."""
    spec = get_family(family)
    merged = {**spec.defaults, **params}
    return _BUILDERS[family](merged, num_classes, image_size or spec.image_size, weights)


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters grouped for the optimizer; "lr_scale" multiplies the group's learning rate."""
    if isinstance(model, MobileNetClassifier) and not model.frozen:
        return [
            {"params": list(model.head.parameters()), "lr_scale": 1.0},
            {"params": list(model.backbone.parameters()), "lr_scale": model.backbone_lr_factor},
        ]
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]


__all__ = [
    "FAMILIES",
    "IMAGENET_WEIGHTS",
    "Family",
    "MobileNetClassifier",
    "ParamError",
    "WeightsError",
    "build_model",
    "count_trainable",
    "format_layer_table",
    "get_family",
    "layer_rows",
    "load_mobilenet_v2",
    "parameter_groups",
]
