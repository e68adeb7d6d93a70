"""The blurred image: the "absence" that deletion/insertion remove pixels to, and the baseline of Integrated
Gradients and occlusion (one baseline for every method and metric that needs one; docs/metrics.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpcam.errors import UserError

# RISE's blur (Petsiuk et al. 2018) is an 11x11 Gaussian, sigma 5.
DEFAULT_BLUR_SIGMA = 5.0
DEFAULT_BLUR_KERNEL = 11


def blur_baseline(
    x: torch.Tensor, sigma: float = DEFAULT_BLUR_SIGMA, kernel_size: int = DEFAULT_BLUR_KERNEL
) -> torch.Tensor:
    """Gaussian blur of ``x`` ``(B, C, H, W)`` with reflect padding; same shape.

    torchvision's ``gaussian_blur`` (same kernel, padding and depthwise convolution; the tests pin
    it to torchvision's output) in three torch calls, because importing torchvision costs every
    explain process about 2.5 s. The kernel is made odd and shrunk to fit the image (reflect
    padding needs kernel // 2 < H, W).
    """
    if sigma <= 0:
        raise UserError(f"blur sigma {sigma} must be > 0 (deletion/insertion baseline)")
    k = int(kernel_size) | 1  # odd
    k = max(1, min(k, 2 * (min(x.shape[-2:]) - 1) + 1))
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=x.dtype, device=x.device)
    pdf = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    k1 = pdf / pdf.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])
