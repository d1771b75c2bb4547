"""The networks of the study, each built from a plain dict of hyperparameters; parameter counts and layer tables.

Knows networks only: nothing here imports Optuna, storage or the training loop. Which hyperparameters a
network has, their defaults and ranges, live with its family in `search/families/`. Names are loaded on first
use (PEP 562), so `from models import ParamError` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "IMAGENET_WEIGHTS": "models.mobilenet",
    "MobileNetClassifier": "models.mobilenet",
    "ParamError": "models.errors",
    "WeightsError": "models.errors",
    "build_cnn": "models.cnn",
    "build_logreg": "models.linear",
    "build_mlp": "models.linear",
    "build_mobilenet": "models.mobilenet",
    "count_trainable": "models.summary",
    "format_layer_table": "models.summary",
    "layer_rows": "models.summary",
    "load_mobilenet_v2": "models.mobilenet",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
