"""Whole-batch image operations on the images' device: resize, normalize, random flip/rotation/translation/cutout."""

from __future__ import annotations

import functools

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


def augment(
    images: torch.Tensor,
    flip_p: float,
    max_rotation: float,
    generator: torch.Generator,
    max_translate: int = 0,
    cutout: int = 0,
) -> torch.Tensor:
    """Per image, each drawn at random: horizontal flip with probability `flip_p`, rotation uniform in
    +-`max_rotation` degrees, translation by a whole number of pixels uniform in +-`max_translate` along each
    axis (pad-and-crop style), and one `cutout` x `cutout` square at a uniform position inside the image set to 0.

    For float images after `normalize`, where zero is the mean colour that fills what moves in. Random numbers
    come from `generator`, which must live on images.device, so nothing waits on the host. With all levers off
    the input is returned; flip, rotation and translation are one resampling (see `augment_with`). Each lever
    draws its numbers only when on, after the ones before it, so flip and rotation alone draw exactly what they
    drew before translation and cutout existed.
    """
    if flip_p == 0 and max_rotation == 0 and max_translate == 0 and cutout == 0:
        return images
    batch, device = images.shape[0], images.device
    height, width = images.shape[-2:]
    flip = torch.rand(batch, generator=generator, device=device) < flip_p
    degrees = shift = corner = None
    if max_rotation:
        degrees = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * max_rotation
    if max_translate:
        shift = torch.randint(-max_translate, max_translate + 1, (batch, 2), generator=generator, device=device)
    if cutout:
        side = min(cutout, height, width)
        corner = torch.stack(
            [torch.randint(0, n - side + 1, (batch,), generator=generator, device=device) for n in (width, height)], 1
        )
    flip = flip if flip_p > 0 else None  # drawn all the same, to keep each lever's draws where they were
    return augment_with(images, flip=flip, degrees=degrees, shift=shift, cutout=cutout, cutout_corner=corner)


def augment_with(
    images: torch.Tensor,
    *,
    flip: torch.Tensor | None = None,
    degrees: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    cutout: int = 0,
    cutout_corner: torch.Tensor | None = None,
) -> torch.Tensor:
    """`augment` with given per-image values instead of random ones, for pictures and tests.

    flip: bool [B]; degrees: float [B] (counter-clockwise on screen); shift: int [B, 2], pixels right and down;
    cutout_corner: int [B, 2], the square's left column and top row. With a rotation, flip, rotation and
    shift are one bilinear grid_sample (zero padding); without one they are an exact integer gather (a flip
    alone, torch.flip). Rotation is in normalized coordinates: a true rotation for square images.
    The result keeps the input's memory format (channels-last stays channels-last).
    """
    out = images
    if degrees is not None:
        out = _resample(images, flip, degrees, shift)
    elif shift is not None:
        out = _shift(images, flip, shift)
    elif flip is not None:
        out = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if cutout and cutout_corner is not None:
        out = _cut_out(out if out is not images else images.clone(), cutout, cutout_corner)
    return out


def augmentation_examples(
    image: torch.Tensor, max_rotation: float = 0.0, max_translate: int = 0, cutout: int = 0
) -> dict[str, torch.Tensor]:
    """One [3, H, W] float image under each lever alone at its full setting: what a report shows.

    "flipped" always; "rotated" by +max_rotation degrees, "translated" by max_translate pixels right and down,
    and "cut out" (a centred square) when their setting is not zero.
    """
    one, device = image.unsqueeze(0), image.device
    examples = {"flipped": augment_with(one, flip=torch.ones(1, dtype=torch.bool, device=device))}
    if max_rotation:
        examples["rotated"] = augment_with(one, degrees=torch.tensor([float(max_rotation)], device=device))
    if max_translate:
        examples["translated"] = augment_with(one, shift=torch.tensor([[max_translate] * 2], device=device))
    if cutout:
        side = min(cutout, *image.shape[-2:])
        centred = [(image.shape[-1] - side) // 2, (image.shape[-2] - side) // 2]
        examples["cut out"] = augment_with(one, cutout=cutout, cutout_corner=torch.tensor([centred], device=device))
    return {name: example[0] for name, example in examples.items()}


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _resample(
    images: torch.Tensor, flip: torch.Tensor | None, degrees: torch.Tensor, shift: torch.Tensor | None
) -> torch.Tensor:
    """Flip, rotation and translation as one bilinear grid_sample; the grid is built by broadcasting, as
    affine_grid's batched matmul costs more than the sampling itself on the CPU.
    """
    batch, _, height, width = images.shape
    dtype, device = images.dtype, images.device
    angle = torch.deg2rad(degrees.to(dtype))
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = 1.0 - 2.0 * flip.to(dtype) if flip is not None else torch.ones_like(cos)  # -1 flips x: input_x = -output_x
    # input = A @ (output - d) in normalized coordinates: the flipped, rotated image moves by d (2 / size per pixel)
    a = torch.stack([torch.stack([cos * sign, -sin], 1), torch.stack([sin * sign, cos], 1)], 1)  # [B, 2, 2]
    b = None
    if shift is not None:
        d = torch.stack([shift[:, 0] * (2 / width), shift[:, 1] * (2 / height)], 1).to(dtype)  # no host tensor
        b = -(a @ d.unsqueeze(-1)).squeeze(-1)  # [B, 2]
    xs = (torch.arange(width, dtype=dtype, device=device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=dtype, device=device) * 2 + 1) / height - 1
    grid = torch.empty(batch, height, width, 2, dtype=dtype, device=device)
    for k in range(2):
        along_y = a[:, k, 1].view(-1, 1, 1) * ys.view(1, -1, 1)
        if b is not None:
            along_y = along_y + b[:, k].view(-1, 1, 1)
        torch.add(a[:, k, 0].view(-1, 1, 1) * xs.view(1, 1, -1), along_y, out=grid[..., k])
    memory_format = _memory_format(images)
    sampled = F.grid_sample(images.contiguous(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.contiguous(memory_format=memory_format)


def _shift(images: torch.Tensor, flip: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """Flip and whole-pixel translation as one gather: exact pixel copies, zeros where the image moved away."""
    batch, channels, height, width = images.shape
    device = images.device
    source_x = torch.arange(width, device=device) - shift[:, 0:1]  # [B, W]: the image moves right by shift x
    if flip is not None:
        source_x = torch.where(flip.view(-1, 1), width - 1 - source_x, source_x)
    source_y = torch.arange(height, device=device).expand(batch, height) - shift[:, 1:2]
    inside = ((source_y >= 0) & (source_y < height)).view(batch, 1, height, 1) & (
        (source_x >= 0) & (source_x < width)
    ).view(batch, 1, 1, width)
    index = source_y.clamp(0, height - 1).view(batch, -1, 1) * width + source_x.clamp(0, width - 1).view(batch, 1, -1)
    memory_format = _memory_format(images)
    flat = images.contiguous().view(batch, channels, height * width)
    moved = flat.gather(2, index.view(batch, 1, -1).expand(batch, channels, -1)).view(images.shape)
    return moved.masked_fill_(~inside, 0).contiguous(memory_format=memory_format)


def _cut_out(images: torch.Tensor, cutout: int, corner: torch.Tensor) -> torch.Tensor:
    """Zero one square of side `cutout` per image, its top-left pixel at corner (column, row), in place."""
    height, width = images.shape[-2:]
    side = min(cutout, height, width)
    columns = torch.arange(width, device=images.device).view(1, -1)
    rows = torch.arange(height, device=images.device).view(1, -1)
    in_x = (columns >= corner[:, 0:1]) & (columns < corner[:, 0:1] + side)
    in_y = (rows >= corner[:, 1:2]) & (rows < corner[:, 1:2] + side)
    return images.masked_fill_(in_y[:, None, :, None] & in_x[:, None, None, :], 0)
