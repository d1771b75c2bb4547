"""Fine-tuned ImageNet MobileNetV2 (the study's model 5): every weight trained, the backbone at a smaller rate."""

from models import build_mobilenet
from search.families._mobilenet import head_space
from search.family import Family
from search.space import real
from search.training import training_space

FAMILY = Family(
    name="mobilenet_finetune",
    title="fine-tuned MobileNetV2",
    order=5,
    build=lambda params, num_classes, image_size, weights: build_mobilenet(params, num_classes, weights, frozen=False),
    pretrained=True,
    image_size=96,
    space=[
        *head_space(fc1=(64, 512), fc2=(16, 256)),
        real("backbone_lr_factor", 0.01, 1.0, log=True, default=0.1, limits=(0.0, 10.0),
             help="the backbone learns at lr x this"),
        *training_space(lr=(1e-4, 5e-3), weight_decay=(1e-6, 1e-3), batch_sizes=(32, 64, 128, 256, 512, 1024),
                        epochs=50),
    ],
    reference={"fc1": 200, "fc2": 100, "dropout": 0.05, "head_input": "features", "image_size": 96,
               "backbone_lr_factor": 0.1, "optimizer": "adam", "lr": 5e-4, "weight_decay": 1e-4, "batch_size": 64,
               "epochs": 20},
    # no pack_members: a whole MobileNetV2 (depthwise convolutions, residual blocks) is not stacked, so it trains alone
    study_results={"val_accuracy": 0.871, "test_accuracy": 0.8813, "test_loss": 0.389, "parameters": "all"},
    n_trials=12,
    time_budget={"cpu": 1800.0, "cuda": 900.0},
)
