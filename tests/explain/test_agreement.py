"""Map agreement against known values and scipy's Spearman correlation."""

import math

import pytest
import scipy.stats
import torch

from dpcam.explain.agreement import average_ranks, map_agreement


def test_map_agreement_known_values():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])  # one swap: ρ = 1 − 6·2 / (4·15) = 0.8
    rho = map_agreement(torch.stack([a, a, a]), torch.stack([a, -a, b]))
    torch.testing.assert_close(rho, torch.tensor([1.0, -1.0, 0.8]))


def test_map_agreement_ties_match_scipy_and_constant_is_nan():
    gen = torch.Generator().manual_seed(5)
    a = (torch.rand(3, 6, 6, generator=gen) * 4).floor().clamp_min(1) - 1  # many ties (zeros)
    b = (torch.rand(3, 6, 6, generator=gen) * 3).floor()
    rho = map_agreement(a, b)
    for k in range(3):
        expected = scipy.stats.spearmanr(a[k].flatten().numpy(), b[k].flatten().numpy()).statistic
        assert float(rho[k]) == pytest.approx(expected, abs=1e-6)
    assert average_ranks(torch.tensor([[0.0, 0.0, 1.0, 0.0]])).tolist() == [[2.0, 2.0, 4.0, 2.0]]
    const = map_agreement(torch.zeros(1, 3, 3), torch.rand(1, 3, 3))
    assert math.isnan(float(const[0]))
