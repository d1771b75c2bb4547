"""Logistic regression on raw pixels: the study's model 1."""

from models import build_logreg
from search.family import Family
from search.training import PACK_MEMBER_PARAMS, training_space

FAMILY = Family(
    name="logreg",
    title="logistic regression",
    order=1,
    build=lambda params, num_classes, image_size, weights: build_logreg(num_classes, image_size),
    space=training_space(lr=(1e-5, 3e-2), weight_decay=(1e-6, 1e-2), batch_sizes=(32, 64, 128, 256, 512), epochs=60),
    reference={"optimizer": "adam", "lr": 1e-4, "weight_decay": 5e-4, "batch_size": 64, "epochs": 40},
    study_results={"val_accuracy": 0.261, "test_accuracy": 0.2479, "test_loss": 2.244, "parameters": 122_890},
    pack_members=PACK_MEMBER_PARAMS,
    n_trials=20,
    time_budget={"cpu": 180.0, "cuda": 60.0},
)
