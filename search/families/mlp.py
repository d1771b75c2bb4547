"""The fully connected net: the study's model 2, 3 to 6 hidden blocks with per-layer width and dropout."""

from models import build_mlp
from search.family import Family
from search.space import choice, integer, real
from search.training import PACK_MEMBER_PARAMS, training_space

MAX_LAYERS = 6
_STUDY_WIDTHS = (2048, 1024, 512, 256, 128)  # the study's best: 27,960,202 trainable parameters at 64x64

FAMILY = Family(
    name="mlp",
    title="fully connected net",
    order=2,
    build=lambda params, num_classes, image_size, weights: build_mlp(params, num_classes, image_size),
    space=[
        integer("n_layers", 3, MAX_LAYERS, limits=(1, MAX_LAYERS)),
        *[integer(f"width_{i}", 64, 4096, log=True, limits=(1, 16384), when=lambda p, i=i: p["n_layers"] >= i)
          for i in range(1, MAX_LAYERS + 1)],
        *[real(f"dropout_{i}", 0.0, 0.5, default=0.1, limits=(0.0, 0.99), when=lambda p, i=i: p["n_layers"] >= i)
          for i in range(1, MAX_LAYERS + 1)],
        choice("batch_norm", True, False),
        *training_space(lr=(1e-4, 1e-2), weight_decay=(1e-5, 1e-2), batch_sizes=(128, 256, 512, 1024), epochs=50),
    ],
    reference={
        "n_layers": len(_STUDY_WIDTHS),
        **{f"width_{i}": w for i, w in enumerate(_STUDY_WIDTHS, start=1)},
        **{f"dropout_{i}": 0.1 for i in range(1, len(_STUDY_WIDTHS) + 1)},
        "batch_norm": True,
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 512, "epochs": 40,
    },
    study_results={"val_accuracy": 0.399, "test_accuracy": 0.3766, "test_loss": 1.696, "parameters": 27_960_202},
    pack_members=(*PACK_MEMBER_PARAMS, *(f"dropout_{i}" for i in range(1, MAX_LAYERS + 1))),
    n_trials=20,
    time_budget={"cpu": 600.0, "cuda": 120.0},
)
