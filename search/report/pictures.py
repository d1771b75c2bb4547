"""The data pictures the reference report opened with, drawn with PIL from the study's own train images.

Part 1: 4 random images per class, one row per class, the label at the row's start.
Part 2: one random train image as original vs flipped and vs rotated, as the study showed it, and vs
translated and cut out, the levers the search adds.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from data import ImageSet, augmentation_examples, printable

PICTURE_SIZE = 96
_GAP = 4
_BACKGROUND = (255, 255, 255)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def _font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def data_grid(images: ImageSet, per_class: int = 4, seed: int = 0) -> Image.Image:
    """A row per class: its label, then `per_class` random images of it."""
    generator = torch.Generator().manual_seed(seed)
    font = _font()
    side = images.images.shape[-1]
    names = [printable(name) for name in images.classes]
    label_width = 12 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(c, font=font)) for c in names)
    grid = Image.new("RGB", (label_width + per_class * (side + _GAP), len(images.classes) * (side + _GAP)), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(names):
        top = row * (side + _GAP)
        draw.text((4, top + side // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        members = torch.nonzero(images.labels.cpu() == row).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:per_class]]
        for column, index in enumerate(chosen.tolist()):
            grid.paste(_to_pil(images.images[index]), (label_width + column * (side + _GAP), top))
    return grid


# Each lever at a setting the search may pick, so the picture shows what it does: the study's flip and
# rotation by 8 degrees, and translation and cutout, which the search adds.
SHOWN = {"max_rotation": 8.0, "translate": 0.125, "cutout": 0.25}


def augmentation_picture(images: ImageSet, seed: int = 0) -> Image.Image:
    """One random train image: a row per lever, original vs flipped, rotated, translated and cut out."""
    generator = torch.Generator().manual_seed(seed)
    index = int(torch.randint(len(images), (1,), generator=generator))
    original = images.images[index].cpu().float()
    side = original.shape[-1]
    examples = augmentation_examples(original, max_rotation=SHOWN["max_rotation"],
                                     max_translate=round(SHOWN["translate"] * side), cutout=round(SHOWN["cutout"] * side))
    font = _font()
    caption = 22
    picture = Image.new("RGB", (2 * side + 3 * _GAP, len(examples) * (side + caption + _GAP)), _BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for row, (name, changed) in enumerate(examples.items()):
        top = row * (side + caption + _GAP)
        for column, (image, label) in enumerate(((original, "original"), (changed, name))):
            left = _GAP + column * (side + _GAP)
            draw.text((left, top + 2), label, fill=(0, 0, 0), font=font)
            picture.paste(_to_pil(image.round().clamp(0, 255).to(torch.uint8)), (left, top + caption))
    return picture
