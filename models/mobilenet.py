"""ImageNet MobileNetV2 with the study's small head, frozen or fine-tuned."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from models.errors import WeightsError
from models.linear import two_hidden_layers

HEAD_INPUTS = ("features", "logits")
FEATURE_WIDTH = {"features": 1280, "logits": 1000}
IMAGENET_WEIGHTS = "imagenet"


def load_mobilenet_v2(weights: str | Path | None) -> nn.Module:
    """torchvision's MobileNetV2 with `weights`: "imagenet" (downloaded once), a state-dict file, or None (random)."""
    if weights is None or str(weights) == "none":
        return mobilenet_v2(weights=None)
    if str(weights) == IMAGENET_WEIGHTS:
        try:
            return mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad download fails its hash check
            raise WeightsError(
                f"could not download MobileNetV2 ImageNet weights into {torch.hub.get_dir()}/checkpoints "
                f"({error.__class__.__name__}: {error}); connect to the internet and run again, "
                f"or pass --weights PATH to a local torchvision state dict"
            ) from None
    path = Path(weights)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise WeightsError(f"weights file {path} {state}; pass --weights imagenet, none, or an existing file")
    model = mobilenet_v2(weights=None)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as error:
        lines = str(error).strip().splitlines()
        reason = f"{error.__class__.__name__}: {lines[0]}" if lines else error.__class__.__name__
        if isinstance(error, pickle.UnpicklingError):  # e.g. torch.save(model) instead of torch.save(model.state_dict())
            reason = "it holds pickled objects, not only tensors; save model.state_dict() instead"
        raise WeightsError(f"{path} is not a torchvision MobileNetV2 state dict ({reason})") from None
    return model


class MobileNetBackbone(nn.Module):
    """MobileNetV2 up to its 1,280 pooled features, or (as the study did) up to its 1,000 ImageNet logits."""

    def __init__(self, net: nn.Module, head_input: str) -> None:
        super().__init__()
        self.features = net.features
        self.classifier = net.classifier if head_input == "logits" else None
        self.out_features = FEATURE_WIDTH[head_input]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x) if self.classifier is not None else x


class MobileNetClassifier(nn.Module):
    """A backbone and a trained head; a frozen backbone stays in eval mode and has no trainable parameter."""

    def __init__(self, backbone: MobileNetBackbone, head: nn.Module, frozen: bool, backbone_lr_factor: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen = frozen
        self.backbone_lr_factor = backbone_lr_factor
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "MobileNetClassifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen means frozen batch-norm statistics too
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """For the optimizer: a fine-tuned backbone learns at lr x backbone_lr_factor, the head at lr."""
        if self.frozen:
            return [{"params": list(self.head.parameters()), "lr_scale": 1.0}]
        return [
            {"params": list(self.head.parameters()), "lr_scale": 1.0},
            {"params": list(self.backbone.parameters()), "lr_scale": self.backbone_lr_factor},
        ]


def build_head(params: dict[str, Any], in_features: int, num_classes: int) -> nn.Module:
    """The study's head: `models.linear.two_hidden_layers` on the backbone's output."""
    return nn.Sequential(*two_hidden_layers(in_features, int(params["fc1"]), int(params["fc2"]),
                                            float(params["dropout"]), num_classes))


def build_mobilenet(params: dict[str, Any], num_classes: int, weights: str | Path | None, frozen: bool) -> MobileNetClassifier:
    """Reads fc1, fc2, dropout, head_input (features or logits) and, fine-tuned, backbone_lr_factor."""
    head_input = params["head_input"]
    factor = 1.0 if frozen else float(params["backbone_lr_factor"])
    backbone = MobileNetBackbone(load_mobilenet_v2(weights), head_input)
    head = build_head(params, backbone.out_features, num_classes)
    return MobileNetClassifier(backbone, head, frozen=frozen, backbone_lr_factor=factor)
