"""The study's small CNN: 2 to 4 blocks [Conv, BatchNorm, ReLU, Pool], then two hidden linear layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.params import ParamError, get_choice, get_float, get_int

# The study's best CNN: channels 12/12/42 (162,064 trainable parameters at 64x64).
CNN_DEFAULTS: dict[str, Any] = {
    "n_conv": 3,
    "channels_1": 12,
    "channels_2": 12,
    "channels_3": 42,
    "channels_4": 64,
    "pool_1": 2,
    "pool_2": 2,
    "pool_3": 4,
    "pool_4": 2,
    "kernel_size": 3,
    "pool_type": "max",
    "fc1": 200,
    "fc2": 100,
    "dropout": 0.05,
}
POOL_TYPES = ("max", "avg")


def build_cnn(params: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
    n_conv = get_int(params, "n_conv", 2, 4)
    kernel = get_int(params, "kernel_size", 1, 11)
    if kernel % 2 == 0:
        raise ParamError(f"kernel_size must be odd (same padding), got {kernel}")
    pool = nn.MaxPool2d if get_choice(params, "pool_type", POOL_TYPES) == "max" else nn.AvgPool2d
    dropout = get_float(params, "dropout", 0.0, 1.0, high_open=True)
    layers: list[nn.Module] = []
    channels_in, size = 3, image_size
    for i in range(1, n_conv + 1):
        channels = get_int(params, f"channels_{i}", 1)
        # A pool wider than what is left of the image pools it to one pixel, so every sampled
        # combination of pool sizes is a valid network.
        pool_size = min(get_int(params, f"pool_{i}", 1), size)
        size //= pool_size
        layers += [
            nn.Conv2d(channels_in, channels, kernel, padding=kernel // 2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            pool(pool_size),
        ]
        channels_in = channels
    fc1, fc2 = get_int(params, "fc1", 1), get_int(params, "fc2", 1)
    layers += [
        nn.Flatten(),
        nn.Linear(channels_in * size * size, fc1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(fc1, fc2),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(fc2, num_classes),
    ]
    return nn.Sequential(*layers)
