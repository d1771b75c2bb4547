"""Whole-batch image operations: resize, normalize and random flip/rotation, all on the images' device."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RESIZE_CHUNK = 1024  # bounds the float copy torchvision may make of a big uint8 batch


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size], antialiased bilinear; returned as is when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [
        TF.resize(chunk, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    return torch.cat(chunks).contiguous()


@functools.lru_cache(maxsize=None)
def _normalize_scale_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel x * scale + shift == (x / 255 - mean) / std, built once per device (no copy per batch)."""
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalized with the ImageNet mean/std, on the same device."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    scale, shift = _normalize_scale_shift(images_uint8.device)
    return images_uint8.float().mul_(scale).add_(shift)  # in place: 3x faster on the CPU than addcmul's broadcast


def augment(images: torch.Tensor, flip_p: float, max_rotation: float, generator: torch.Generator) -> torch.Tensor:
    """Per image: horizontal flip with probability `flip_p`, rotation uniform in +-`max_rotation` degrees.

    The whole batch goes through one affine_grid + grid_sample (bilinear, zero padding: zero is the mean
    after `normalize`). Random numbers come from `generator`, which must live on images.device, so nothing
    waits on the host. Without rotation the flip is an exact torch.flip; with neither the input is returned.
    Rotation is in normalized coordinates, which is a true rotation for the square images used here.
    """
    if flip_p == 0 and max_rotation == 0:
        return images
    batch, device = images.shape[0], images.device
    flip = torch.rand(batch, generator=generator, device=device) < flip_p
    if max_rotation == 0:
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    angle = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.radians(max_rotation)
    sign = 1.0 - 2.0 * flip.to(images.dtype)  # -1 flips x: input_x = -output_x
    cos, sin = torch.cos(angle).to(images.dtype), torch.sin(angle).to(images.dtype)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * sign, -sin, zero], 1), torch.stack([sin * sign, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
