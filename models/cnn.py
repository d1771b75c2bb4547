"""The study's small CNN: 2 to 4 blocks [Conv, BatchNorm, ReLU, Pool], then two hidden linear layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.linear import two_hidden_layers
from models.errors import ParamError


def build_cnn(params: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
    """Reads n_conv, channels_i and pool_i (i = 1..n_conv), kernel_size, pool_type (max or avg), fc1, fc2, dropout."""
    n_conv, kernel = int(params["n_conv"]), int(params["kernel_size"])
    if kernel % 2 == 0:
        raise ParamError(f"kernel_size must be odd (same padding), got {kernel}")
    pool = nn.MaxPool2d if params["pool_type"] == "max" else nn.AvgPool2d
    dropout = float(params["dropout"])
    layers: list[nn.Module] = []
    channels_in, size = 3, image_size
    for i in range(1, n_conv + 1):
        channels = int(params[f"channels_{i}"])
        # A pool wider than what is left of the image pools it to one pixel, so every sampled
        # combination of pool sizes is a valid network.
        pool_size = min(int(params[f"pool_{i}"]), size)
        size //= pool_size
        layers += [
            nn.Conv2d(channels_in, channels, kernel, padding=kernel // 2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            pool(pool_size),
        ]
        channels_in = channels
    layers += [nn.Flatten(),
               *two_hidden_layers(channels_in * size * size, int(params["fc1"]), int(params["fc2"]), dropout, num_classes)]
    return nn.Sequential(*layers)
