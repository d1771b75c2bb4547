"""What the frozen and the fine-tuned MobileNetV2 families share: the head's dimensions and the image size."""

from models.mobilenet import HEAD_INPUTS
from search.space import Dim, choice, integer, real

IMAGE_SIZES = (96, 128, 160)  # the frozen features are about 7 points better at 160 px than at 96 px


def head_space(fc1: tuple[int, int], fc2: tuple[int, int]) -> list[Dim]:
    return [
        integer("fc1", *fc1, log=True, limits=(1, 16384)),
        integer("fc2", *fc2, log=True, limits=(1, 16384)),
        real("dropout", 0.0, 0.5, default=0.05, limits=(0.0, 0.99)),
        choice("head_input", "features", allowed=HEAD_INPUTS,
               help="features: the 1,280 pooled features; logits: the 1,000 ImageNet logits, as the study did"),
        choice("image_size", *IMAGE_SIZES, limits=(32, 512), help="input side in pixels"),
    ]
