"""Agreement of two explanation maps of the same images: Spearman's rank correlation per image (with the
non-private run's maps, or with a randomised model's for the randomisation check)."""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim of ``(B, n)`` with ties given their average rank (as scipy); float64."""
    v = values.flatten(1)
    b, n = v.shape
    sorted_v, order = torch.sort(v, dim=1, stable=True)
    new_group = torch.ones_like(sorted_v, dtype=torch.long)
    new_group[:, 1:] = (sorted_v[:, 1:] != sorted_v[:, :-1]).long()
    group = new_group.cumsum(dim=1) - 1  # (B, n) group id in sorted order
    pos = torch.arange(1, n + 1, device=v.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b, n, device=v.device, dtype=torch.float64).scatter_add_(1, group, pos)
    cnts = torch.zeros(b, n, device=v.device, dtype=torch.float64).scatter_add_(1, group, torch.ones_like(pos))
    avg = (sums / cnts.clamp_min(1)).gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)


def map_agreement(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between two map batches ``(B, H, W)`` → float32 ``(B,)``.

    Pearson correlation of the pixels' average ranks (ties share their mean rank, as
    ``scipy.stats.spearmanr``; Grad-CAM maps have many tied zeros after the ReLU, and ordinal
    ranks would make those ties look like agreement). NaN where either map is constant (the
    correlation is undefined); skip those images when averaging.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"maps of shapes {tuple(maps_a.shape)} and {tuple(maps_b.shape)} cannot be compared")
    ra = average_ranks(maps_a)
    rb = average_ranks(maps_b.to(maps_a.device))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / den
    rho = torch.where(den > 0, rho.clamp(-1.0, 1.0), torch.full_like(rho, float("nan")))
    return rho.float()
