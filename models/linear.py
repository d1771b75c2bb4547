"""Logistic regression and the fully connected net of the study: flat pixels in, class logits out."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.errors import ParamError


def two_hidden_layers(in_features: int, fc1: int, fc2: int, dropout: float, num_classes: int) -> list[nn.Module]:
    """Linear(in, fc1), ReLU, Dropout, Linear(fc1, fc2), ReLU, Dropout, Linear(fc2, classes): the study's
    classifier on top of the CNN's convolutions and of MobileNetV2's features alike."""
    return [
        nn.Linear(in_features, fc1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(fc1, fc2),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(fc2, num_classes),
    ]


def build_logreg(num_classes: int, image_size: int) -> nn.Module:
    """Flatten, Linear(3*S*S, classes): softmax regression on raw pixels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))


def build_mlp(params: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
    """Linear(3*S*S, w1), ReLU, Dropout, then blocks [Linear, BatchNorm1d, ReLU, Dropout], then Linear(w_last, classes).

    Reads n_layers, width_i, dropout_i (i = 1..n_layers) and batch_norm. The first layer has no batch norm:
    that is the layout whose count matches the study (27,960,202).
    """
    n_layers = int(params["n_layers"])
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = 3 * image_size * image_size
    for i in range(1, n_layers + 1):
        missing = [key for key in (f"width_{i}", f"dropout_{i}") if key not in params]
        if missing:
            raise ParamError(f"n_layers={n_layers} needs {', '.join(missing)}")
        width = int(params[f"width_{i}"])
        layers.append(nn.Linear(width_in, width))
        if params["batch_norm"] and i > 1:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(inplace=True), nn.Dropout(float(params[f"dropout_{i}"]))]
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
