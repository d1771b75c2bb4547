"""Parameter counts and a layer-by-layer table, as the study listed them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    trainable: int
    total: int


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One row per module that owns parameters directly (Linear, Conv2d, BatchNorm...)."""
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        rows.append(
            LayerRow(
                name=name or "(model)",
                kind=type(module).__name__,
                trainable=sum(p.numel() for p in own if p.requires_grad),
                total=sum(p.numel() for p in own),
            )
        )
    return rows


def format_layer_table(model: nn.Module, max_rows: int = 40) -> str:
    """A plain-text table; long backbones are shortened to their first and last rows."""
    rows = layer_rows(model)
    if len(rows) > max_rows:
        hidden = len(rows) - max_rows
        rows = rows[: max_rows // 2] + [None] + rows[-max_rows // 2 :]
    width = max([len("layer")] + [len(r.name) for r in rows if r]) + 2
    lines = [f"{'layer':<{width}}{'type':<14}{'trainable':>12}{'total':>12}"]
    for r in rows:
        if r is None:
            lines.append(f"... {hidden} more layers")
        else:
            lines.append(f"{r.name:<{width}}{r.kind:<14}{r.trainable:>12,}{r.total:>12,}")
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"{'total':<{width}}{'':<14}{count_trainable(model):>12,}{total:>12,}")
    return "\n".join(lines)
