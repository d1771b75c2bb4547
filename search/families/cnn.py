"""The study's small CNN (model 3): 2 to 4 conv blocks, then two hidden linear layers."""

from models import build_cnn
from search.family import Family
from search.space import choice, integer, real
from search.training import PACK_MEMBER_PARAMS, training_space

MAX_BLOCKS = 4

FAMILY = Family(
    name="cnn",
    title="CNN",
    order=3,
    build=lambda params, num_classes, image_size, weights: build_cnn(params, num_classes, image_size),
    space=[
        integer("n_conv", 2, MAX_BLOCKS, limits=(1, MAX_BLOCKS)),
        *[integer(f"channels_{i}", 6, 160, log=True, limits=(1, 1024), when=lambda p, i=i: p["n_conv"] >= i)
          for i in range(1, MAX_BLOCKS + 1)],
        *[choice(f"pool_{i}", 2, 4, 8, limits=(1, 64), when=lambda p, i=i: p["n_conv"] >= i)
          for i in range(1, MAX_BLOCKS + 1)],
        choice("pool_type", "max", "avg"),
        choice("kernel_size", 3, 5, limits=(1, 11)),
        integer("fc1", 64, 512, log=True, limits=(1, 16384)),
        integer("fc2", 32, 256, log=True, limits=(1, 16384)),
        real("dropout", 0.0, 0.5, default=0.05, limits=(0.0, 0.99)),
        *training_space(lr=(1e-4, 1e-2), weight_decay=(1e-5, 3e-2), batch_sizes=(16, 32, 64, 128, 256, 512), epochs=60),
    ],
    # The study's best CNN: channels 12/12/42 with pools 2/2/4, 162,064 trainable parameters at 64x64.
    reference={
        "n_conv": 3, "channels_1": 12, "channels_2": 12, "channels_3": 42, "pool_1": 2, "pool_2": 2, "pool_3": 4,
        "kernel_size": 3, "pool_type": "max", "fc1": 200, "fc2": 100, "dropout": 0.05,
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 64, "epochs": 40,
    },
    study_results={"val_accuracy": 0.639, "test_accuracy": 0.5758, "test_loss": 1.193, "parameters": 162_064},
    pack_members=(*PACK_MEMBER_PARAMS, "dropout"),
    n_trials=30,
    time_budget={"cpu": 900.0, "cuda": 300.0},
)
