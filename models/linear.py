"""Logistic regression and the fully connected net of the study: flat pixels in, class logits out."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.params import ParamError, get_bool, get_float, get_int

LOGREG_DEFAULTS: dict[str, Any] = {}

# The study's best fully connected net: widths 2048-1024-512-256-128, batch norm on the hidden blocks.
MLP_DEFAULTS: dict[str, Any] = {
    "n_layers": 5,
    **{f"width_{i}": w for i, w in enumerate((2048, 1024, 512, 256, 128), start=1)},
    **{f"dropout_{i}": 0.1 for i in range(1, 6)},
    "batch_norm": True,
}
MAX_MLP_LAYERS = 6
MLP_PARAM_NAMES = frozenset(
    {"n_layers", "batch_norm"}
    | {f"{kind}_{i}" for kind in ("width", "dropout") for i in range(1, MAX_MLP_LAYERS + 1)}
)


def build_logreg(params: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
    """Flatten, Linear(3*S*S, classes): softmax regression on raw pixels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))


def build_mlp(params: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
    """Linear(3*S*S, w1), ReLU, Dropout, then blocks [Linear, BatchNorm1d, ReLU, Dropout], then Linear(w_last, classes).

    The first layer has no batch norm: that is the layout whose count matches the study (27,960,202).
    """
    n_layers = get_int(params, "n_layers", 1, MAX_MLP_LAYERS)
    batch_norm = get_bool(params, "batch_norm")
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = 3 * image_size * image_size
    for i in range(1, n_layers + 1):
        for key in (f"width_{i}", f"dropout_{i}"):
            if key not in params:
                raise ParamError(f"n_layers={n_layers} needs {key}")
        width = get_int(params, f"width_{i}", 1)
        dropout = get_float(params, f"dropout_{i}", 0.0, 1.0, high_open=True)
        layers.append(nn.Linear(width_in, width))
        if batch_norm and i > 1:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
