"""Localisation on lesion masks: the pointing game (a disc of tolerance around the lesions), its chance
rate for a random map, and the energy-based pointing game."""

from __future__ import annotations

import math

import torch

from dpcam.errors import UserError

# Pointing game: Zhang et al. (2016) use a 15 px tolerance on 224 px images; scaled to the image.
POINTING_TOLERANCE_AT_224 = 15


def has_mask(masks: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` masks → bool ``(B,)``: True where the mask is non-empty (e.g. grade > 0)."""
    return (masks.flatten(1) > 0).any(dim=1)


def default_tolerance(height: int, width: int) -> int:
    """Zhang et al.'s 15 px at 224 px, scaled to the image: ``round(15 · min(H, W) / 224)``."""
    return int(round(POINTING_TOLERANCE_AT_224 * min(height, width) / 224))


def dilate_disc(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Bool ``(B, H, W)``: the pixels within Euclidean distance ≤ ``tolerance`` of a pixel > 0 of ``masks``.

    Exact for the pixel grid: (y, x) is in the dilation when some mask pixel (y', x') has
    (y − y')² + (x − x')² ≤ t². Computed as a union over row offsets |dy| ≤ t of the mask dilated
    along rows by ⌊√(t² − dy²)⌋ pixels (window sums of a cumulative sum), so the cost is O(t·H·W)
    elementwise operations rather than a (2t+1)² convolution.
    """
    m = masks > 0
    t = int(tolerance)
    if t <= 0:
        return m
    b, h, w = m.shape
    pre = torch.zeros(b, h, w + 1, dtype=torch.int32, device=m.device)
    pre[..., 1:] = m.to(torch.int32).cumsum(-1)
    cols = torch.arange(w, device=m.device)
    out = torch.zeros_like(m)
    for dy in range(min(t, h - 1) + 1):
        half = math.isqrt(t * t - dy * dy)
        hi, lo = (cols + half + 1).clamp(max=w), (cols - half).clamp(min=0)
        rows = (pre[..., hi] - pre[..., lo]) > 0  # dilated along rows by `half`
        out[:, dy:] |= rows[:, : h - dy]  # a mask pixel at row y' reaches rows y' ± dy
        if dy:
            out[:, : h - dy] |= rows[:, dy:]
    return out


def pointing_game(
    maps: torch.Tensor, masks: torch.Tensor, tolerance: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game (Zhang et al. 2016) on lesion masks (docs/metrics.md).

    A hit when **any** maximal pixel of the map (every pixel equal to the map's maximum: a
    bilinearly upsampled coarse map has flat maximum plateaus, and which plateau pixel comes
    first must not decide the hit) lies within Euclidean distance ``tolerance`` of a lesion pixel
    (:func:`dilate_disc`, Zhang et al.'s disc). A constant map (max = min, e.g. all zeros after the
    ReLU) points nowhere and is a **miss**, still counted when the mask is non-empty.

    Args:
        maps: ``(B, H, W)``; compared as given (the explain stage passes the float16-rounded maps
            it saves, so ties are ties at the saved precision).
        masks: ``(B, H, W)``, > 0 on lesion pixels.
        tolerance: pixels; None → :func:`default_tolerance`.

    Returns:
        ``hits`` float32 ``(B,)`` in {0, 1} (0 where not valid) and ``valid`` bool ``(B,)``
        (the mask is non-empty). The score is ``hits[valid].mean()``.
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (B, H, W)")
    h, w = maps.shape[-2:]
    t = default_tolerance(h, w) if tolerance is None else int(tolerance)
    if t < 0:
        raise UserError(f"pointing-game tolerance {tolerance} must be >= 0 pixels")
    flat = maps.flatten(1)
    lo, hi = flat.aminmax(dim=1)
    maximal = flat == hi[:, None]  # (B, H·W): every pixel of the maximum, ties included
    region = dilate_disc(masks.to(maps.device), t).flatten(1)
    valid = has_mask(masks).to(maps.device)
    hits = (maximal & region).any(dim=1) & (hi > lo) & valid
    return hits.float(), valid


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM; masks instead of boxes): ``(B,)`` float32.

    Σ L inside the mask / Σ L over the image, for ``maps`` and ``masks`` ``(B, H, W)`` (maps are
    non-negative Grad-CAM maps). 0 where Σ L = 0 (an all-zero map puts no energy anywhere);
    average only over images with :func:`has_mask`.
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (B, H, W)")
    flat = maps.flatten(1).float()
    inside = (flat * (masks.to(maps.device).flatten(1) > 0)).sum(1)
    total = flat.sum(1)
    return torch.where(
        total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total)
    )


def random_pointing(masks: torch.Tensor, tolerance: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pointing game of a random map: per image, the chance that a uniformly random pixel (the unique
    maximum of a map of i.i.d. continuous values) lands in the tolerance region, |region| / (H·W).

    Exact (no sampling): the baseline a model's pointing game must beat to say its maps point at lesions.
    Returns ``(rate, valid)`` like :func:`pointing_game`.
    """
    h, w = masks.shape[-2:]
    t = default_tolerance(h, w) if tolerance is None else int(tolerance)
    region = dilate_disc(masks, t).flatten(1).float()
    valid = has_mask(masks)
    return region.mean(dim=1) * valid, valid
