"""How many trials a pack holds: 1 where packing does not pay, else as many as the device's memory allows.

On a GPU a small model's step is launch-bound, so K members cost little more than one: a pack fills up to
MEMORY_SHARE of the free memory, at most CUDA_MAX_PACK members, from one member's measured peak. On the CPU
a pack saves what its members share (augmenting each batch once, per-operation overhead, thin matrix
products made wide) but not their arithmetic: `bench/trial_packs.py` measured K=8 at 4.3x the trials/min of
8 solo trials for logreg on 64px images, and 0.94-1.08x for the MLP, the CNN and the frozen head (whose
batches are cached features, nothing to share), so only small convolution-free models on images pack there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from data import ImageSet
from models.stacked import NotStackable, StackedNet
from models.summary import count_trainable
from search.family import Family
from search.pipeline import DataConfig
from search.training import autocast_dtype
from search.trial import has_convolutions, uses_feature_cache

CUDA_MAX_PACK = 16
MEMORY_SHARE = 0.5  # of the device's free memory; the rest stays for other workers and the allocator's slack
CPU_PACK_SIZE = 8
CPU_MAX_MEMBER_PARAMETERS = 1_000_000  # logreg: 123k at 64px; the MLP: 9-28 million


def pack_size(family: Family, device: torch.device, params: dict[str, Any] | None = None,
              parts: dict[str, ImageSet] | None = None, config: DataConfig | None = None) -> int:
    """The automatic pack size for `family` on `device`; a GPU measures one member of `params` on `parts`."""
    params = family.resolve() if params is None else params
    size = parts["train"].images.shape[-1] if parts is not None else family.size_for(params)
    model = packable_model(family, device, params, size)
    if model is None:
        return 1
    if device.type == "cuda":
        if parts is None or config is None:
            raise ValueError("on a GPU the pack size is measured: give params, parts and config")
        first, each = member_bytes(family, params, parts, config, device)
        free, _ = torch.cuda.mem_get_info(device)
        return fit_pack_size(free, first, each, MEMORY_SHARE, CUDA_MAX_PACK)
    return CPU_PACK_SIZE if cpu_pack_pays(model) else 1


def packable_model(family: Family, device: torch.device, params: dict[str, Any], image_size: int
                   ) -> nn.Module | None:
    """The network of `params` (random weights) when members of its shape can train as a pack on `device`; None
    when the family declares no pack members, its trained module does not stack, or the device computes in fp16
    (see run_pack: no per-member loss scaling)."""
    if not family.pack_members or autocast_dtype(device) == torch.float16:
        return None
    model = family.create_model(params, image_size=image_size, weights="none" if family.pretrained else None)
    return model if stackable(model.head if uses_feature_cache(model) else model) else None


def stackable(trained: nn.Module) -> bool:
    """Whether members training this module (the head alone on cached features) stack (`models.stacked`)."""
    try:
        StackedNet.of([trained, trained])
    except NotStackable:
        return False
    return True


def cpu_pack_pays(model: nn.Module) -> bool:
    """A pack pays on the CPU for a network on augmented images, without convolutions, with few parameters."""
    return (not uses_feature_cache(model) and not has_convolutions(model)
            and count_trainable(model) <= CPU_MAX_MEMBER_PARAMETERS)


def fit_pack_size(free_bytes: int, first_bytes: int, each_bytes: int, share: float, most: int) -> int:
    """Members that fit in share x free_bytes: the first costs first_bytes, every further one each_bytes."""
    room = share * free_bytes - first_bytes
    return max(1, min(most, 1 + int(room // max(each_bytes, 1)) if room > 0 else 1))


def member_bytes(family: Family, params: dict[str, Any], parts: dict[str, ImageSet], config: DataConfig,
                 device: torch.device) -> tuple[int, int]:
    """(peak bytes of a pack of one, bytes each further member adds), over one training step on `device`."""
    from search.pack.runner import Member, build_pack

    peaks = []
    build_pack(family, [Member(params, 0)], parts, config, device, 0)  # fills the feature cache, which no member owns
    for k in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        pack, source = build_pack(family, [Member(params, seed) for seed in range(k)], parts, config, device, 0)
        torch.cuda.reset_peak_memory_stats(device)
        pack.train_steps(source.train_batches(1), pack.learning_rates(1), max_steps=1)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - baseline)
        del pack, source
    torch.cuda.empty_cache()
    return peaks[0], max(peaks[1] - peaks[0], 1)


__all__ = ["CUDA_MAX_PACK", "MEMORY_SHARE", "cpu_pack_pays", "fit_pack_size", "member_bytes", "pack_size",
           "packable_model", "stackable"]
