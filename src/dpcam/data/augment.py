"""Training-time augmentation and augmentation multiplicity (De et al. 2022), in torch ops.

``views(x, k, generator, shift)`` returns ``k`` augmented views of every image of a batch, view-major per
example: rows ``i·k … i·k + k − 1`` are example ``i``'s views. Each view is flipped left-right with
probability ½ and translated by up to ``shift`` pixels in each direction (reflection padding, then a crop of
the original size): label-preserving for fundus photographs and for the built-in lesions, and applied to the
training images only (explanations and their lesion masks are scored on unaugmented test images).

With DP-SGD the ``k`` views' per-example gradients are averaged before clipping
(:meth:`dpcam.privacy.setup.PrivateSetup.average_views`), so each example still contributes one gradient of norm ≤ C:
augmentation multiplicity changes the gradient's quality, not its sensitivity or the accounting.

Input ``(B, C, H, W)`` float in [0, 1]; output ``(B·k, C, H, W)``; ``k = 1`` with ``shift = 0`` and no flip is the
identity only when augmentation is off (``train.augment: none`` never calls this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def views(x: torch.Tensor, k: int, generator: torch.Generator, shift: int) -> torch.Tensor:
    """``k`` randomly flipped and shifted views of each image of ``x`` (B, C, H, W) -> (B·k, C, H, W)."""
    if k < 1:
        raise ValueError("augmentation multiplicity must be >= 1")
    rep = x.repeat_interleave(k, dim=0)
    n, _, h, w = rep.shape
    if n == 0:
        return rep
    flip = torch.rand(n, generator=generator) < 0.5
    rep = torch.where(flip.view(n, 1, 1, 1).to(rep.device), rep.flip(-1), rep)
    if shift <= 0:
        return rep
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    padded = F.pad(rep, (shift, shift, shift, shift), mode="reflect")
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(rep.device)  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(rep.device)  # (n, w)
    idx = torch.arange(n, device=rep.device).view(n, 1, 1)
    # padded[i, :, rows[i, a], cols[i, b]] for every (a, b): index the spatial dims per image
    out = padded.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()
