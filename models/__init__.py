"""The networks of the study, each built from a plain dict of hyperparameters; parameter counts and layer tables.

Knows networks only: nothing here imports Optuna, storage or the training loop. Which hyperparameters a
network has, their defaults and ranges, live with its family in `search/families/`.
"""

from models.cnn import build_cnn
from models.linear import build_logreg, build_mlp
from models.mobilenet import IMAGENET_WEIGHTS, MobileNetClassifier, WeightsError, build_mobilenet, load_mobilenet_v2
from models.params import ParamError
from models.summary import count_trainable, format_layer_table, layer_rows

__all__ = [
    "IMAGENET_WEIGHTS",
    "MobileNetClassifier",
    "ParamError",
    "WeightsError",
    "build_cnn",
    "build_logreg",
    "build_mlp",
    "build_mobilenet",
    "count_trainable",
    "format_layer_table",
    "layer_rows",
    "load_mobilenet_v2",
]
