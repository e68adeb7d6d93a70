"""The blurred image is torchvision's Gaussian blur (dpcam computes it without importing torchvision)."""

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from dpcam.explain.blur import blur_baseline


@pytest.mark.parametrize(
    "shape, sigma, kernel", [((2, 3, 16, 16), 5.0, 11), ((1, 3, 32, 24), 1.5, 7), ((3, 1, 5, 5), 2.0, 11)]
)
def test_blur_baseline_is_torchvisions_gaussian_blur(shape, sigma, kernel):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(5))
    k = min(kernel | 1, 2 * (min(shape[-2:]) - 1) + 1)  # shrunk to fit, as blur_baseline does
    torch.testing.assert_close(blur_baseline(x, sigma, kernel), gaussian_blur(x, [k, k], [sigma, sigma]))
