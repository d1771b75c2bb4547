"""Frozen ImageNet MobileNetV2 with a trained head (the study's model 4); features are computed once and cached."""

from models import build_mobilenet
from search.families._mobilenet import head_space
from search.family import Family
from search.space import choice
from search.training import PACK_MEMBER_PARAMS, cached_augmentation_space, training_space

FAMILY = Family(
    name="mobilenet_frozen",
    title="frozen MobileNetV2",
    order=4,
    build=lambda params, num_classes, image_size, weights: build_mobilenet(params, num_classes, weights, frozen=True),
    pretrained=True,
    image_size=96,
    space=[
        *head_space(fc1=(64, 1024), fc2=(16, 256)),
        choice("feature_views", 1, 2, 4, 8, default=4, limits=(1, 64),
               help="augmented views of the train images whose features are computed once"),
        *training_space(lr=(1e-4, 1e-2), weight_decay=(1e-6, 1e-2), batch_sizes=(32, 64, 128, 256, 512), epochs=50,
                        augmentation=cached_augmentation_space()),
    ],
    reference={"fc1": 400, "fc2": 100, "dropout": 0.05, "head_input": "features", "image_size": 96, "feature_views": 4,
               "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 128, "epochs": 30},
    study_results={"val_accuracy": 0.855, "test_accuracy": 0.8294, "test_loss": 0.518, "parameters": "head only"},
    pack_members=(*PACK_MEMBER_PARAMS, "dropout"),
    n_trials=30,
    time_budget={"cpu": 600.0, "cuda": 180.0},
)
