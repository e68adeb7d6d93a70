"""Building blocks shared by dpcam's models (:mod:`dpcam.models`, :mod:`dpcam.tvmodels`).

Every model takes pixel-space input in [0, 1] and normalises it itself (:class:`Normalize`), uses
GroupNorm instead of BatchNorm (per-example gradients need no batch statistics) and no in-place
activations (Opacus's hooks need the activations they saw).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dpcam.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel with fixed buffers (no parameters, so Opacus ignores it).

    Input and output: float ``(B, C, H, W)``; ``mean``/``std`` have C entries. The buffers are
    persistent (saved in the state dict) so a model trained with other statistics reloads them.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not mean:
            raise UserError(f"normalisation mean {mean} and std {std}: give one value of each per channel")
        if min(std) <= 0:
            raise UserError(f"normalisation std {std} must be > 0 for every channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over ``num_channels`` with gcd(num_channels, max_groups) groups (always divides C)."""
    return nn.GroupNorm(math.gcd(num_channels, max_groups), num_channels)


def out_of_place(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every module that has the flag (ReLU, Dropout, ...); returns ``model``."""
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return model
