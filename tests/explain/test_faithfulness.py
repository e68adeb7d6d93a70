"""Deletion/insertion against hand-computed curves and torchvision's blur; ROAD's tie order and curves on toy
models with known evidence."""

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from dpcam.errors import UserError
from dpcam.explain.faithfulness import (
    ROAD_PERCENTS,
    deletion_insertion,
    road,
    road_ranks,
    saliency_ranks,
)
from tests.explain.toys import ELSEWHERE, REGION, ProbModel, brightness, bump, region_model, scene

# ----------------------------------------------------------------------- deletion / insertion


WEIGHTS = torch.tensor([[0.4, 0.3], [0.2, 0.1]])


def weighted(x):
    return (x[:, 0] * WEIGHTS).sum(dim=(1, 2))


def test_deletion_insertion_hand_computed():
    model = ProbModel(weighted)
    x = torch.ones(2, 1, 2, 2)
    maps = torch.stack([WEIGHTS, WEIGHTS.flip(0, 1)])  # most salient first, then the reverse order
    zeros = torch.zeros_like(x)
    d, i, dc, ic = deletion_insertion(model, x, maps, torch.tensor([1, 1]), steps=4, baseline=zeros, return_curves=True)
    torch.testing.assert_close(dc[:, 0], torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0]))
    torch.testing.assert_close(ic[:, 0], torch.tensor([0.0, 0.4, 0.7, 0.9, 1.0]))
    torch.testing.assert_close(d, torch.tensor([0.375, 0.625]))
    torch.testing.assert_close(i, torch.tensor([0.625, 0.375]))
    # K = 3 does not divide 4 pixels: round(k·4/3) = 0, 1, 3, 4 pixels → deletion [1, .6, .1, 0]
    d3, i3 = deletion_insertion(model, x[:1], maps[:1], torch.tensor([1]), steps=3, baseline=zeros[:1])
    torch.testing.assert_close(d3, torch.tensor([(0.5 + 0.6 + 0.1) / 3]))
    torch.testing.assert_close(i3, torch.tensor([(0.4 + 0.9 + 0.5) / 3]))


def test_fraction_kept_model_gives_linear_curves_whatever_the_chunking():
    model = ProbModel(brightness)  # target prob = share of original (1) pixels kept over a 0 baseline
    x = torch.ones(3, 2, 8, 8)
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.ones(3, dtype=torch.long)
    results = [
        deletion_insertion(
            model, x, maps, target, steps=16, baseline=torch.zeros_like(x), max_batch=mb, return_curves=True
        )
        for mb in (None, 1, 7, 1000)
    ]
    d, i, dc, ic = results[0]
    frac = torch.linspace(0, 1, 17)[:, None].expand(17, 3)
    torch.testing.assert_close(dc, 1 - frac)
    torch.testing.assert_close(ic, frac)
    torch.testing.assert_close(d, torch.full((3,), 0.5))
    torch.testing.assert_close(i, torch.full((3,), 0.5))
    assert torch.all(dc[1:] <= dc[:-1]) and torch.all(ic[1:] >= ic[:-1])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_default_baseline_is_the_blurred_image_and_probs_shortcut():
    model = ProbModel(brightness)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 0])
    d, i, dc, ic = deletion_insertion(model, x, maps, target, steps=4, return_curves=True)
    blurred = gaussian_blur(x, [11, 11], [5.0, 5.0])
    p_blur = torch.softmax(model(blurred), 1).gather(1, target[:, None]).squeeze(1)
    p_x = torch.softmax(model(x), 1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(dc[-1], p_blur)
    torch.testing.assert_close(ic[0], p_blur)
    torch.testing.assert_close(dc[0], p_x)
    torch.testing.assert_close(ic[-1], p_x)
    again = deletion_insertion(model, x, maps, target, steps=4, probs=torch.softmax(model(x), 1))
    torch.testing.assert_close(again[0], d)
    torch.testing.assert_close(again[1], i)


def test_deletion_rejects_fewer_than_two_steps():
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(UserError, match="K >= 2"):
        deletion_insertion(ProbModel(brightness), x, torch.ones(1, 2, 2), torch.tensor([1]), steps=1)


def test_saliency_ranks_ties_in_raster_order():
    maps = torch.tensor([[[0.0, 5.0], [5.0, 1.0]]])
    assert saliency_ranks(maps).tolist() == [[[3, 0], [1, 2]]]


# ------------------------------------------------------------------------------------ ROAD


def test_road_ranks_break_ties_by_a_fixed_random_order():
    maps = torch.zeros(2, 6, 6)
    maps[:, 0, 0] = 1.0  # one salient pixel, the rest a plateau of zeros
    ranks = road_ranks(maps, seed=0)
    assert ranks[0, 0, 0] == 0 and ranks[1, 0, 0] == 0
    assert torch.equal(ranks[0], ranks[1])  # the same order for every image
    assert sorted(ranks[0].flatten().tolist()) == list(range(36))
    raster = torch.arange(36).reshape(6, 6)
    assert not torch.equal(ranks[0], raster)  # not row by row
    assert not torch.equal(road_ranks(maps, seed=1)[0], ranks[0])


def test_road_of_a_model_that_ignores_the_image_has_equal_morf_and_lerf():
    model = ProbModel(lambda x: torch.full((x.shape[0],), 0.7))
    x = scene()
    maps = bump(REGION)[None].expand(4, 32, 32)
    out = road(model, x, maps, torch.ones(4, dtype=torch.long), torch.arange(4), return_curves=True)
    assert torch.equal(out["road_morf_auc"], out["road_lerf_auc"]) and torch.all(out["road_gap"] == 0)
    assert torch.allclose(out["morf_curve"], torch.full((len(ROAD_PERCENTS), 4), 0.7))


def test_road_prefers_the_map_that_points_at_the_evidence():
    """MoRF removes the evidence first for the map pointing at it (the imputation cannot restore it from the dark
    surroundings); the map pointing elsewhere removes the evidence late, and then scattered (tie-broken)."""
    model, x, target, idx = region_model(), scene(), torch.ones(4, dtype=torch.long), torch.arange(4)
    right = road(model, x, bump(REGION)[None].expand(4, 32, 32), target, idx)
    wrong = road(model, x, bump(ELSEWHERE)[None].expand(4, 32, 32), target, idx)
    assert torch.all(right["road_morf_auc"] < wrong["road_morf_auc"] - 0.2)
    assert torch.all(right["road_lerf_auc"] > wrong["road_lerf_auc"])
    assert torch.all(right["road_gap"] > wrong["road_gap"] + 0.2)
    assert torch.allclose(right["road_gap"], right["road_lerf_auc"] - right["road_morf_auc"], atol=1e-6)


def test_road_is_reproducible_whatever_the_batch_and_seeded():
    model, x, target = region_model(), scene(6), torch.ones(6, dtype=torch.long)
    maps = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([5, 17, 2, 40, 41, 9])
    a = road(model, x, maps, target, idx)
    b = road(model, x, maps, target, idx)
    halves = [road(model, x[s], maps[s], target[s], idx[s]) for s in (slice(0, 2), slice(2, 6))]
    other_seed = road(model, x, maps, target, idx, seed=1)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], torch.cat([h[key] for h in halves])), key  # per-image numbers and solves
    assert not torch.equal(a["road_morf_auc"], other_seed["road_morf_auc"])  # other noise, other tie order
    no_noise = road(model, x, maps, target, idx, noise=0.0)
    assert not torch.equal(a["road_morf_auc"], no_noise["road_morf_auc"])


def test_road_rejects_bad_percentages():
    model, x = region_model(), scene(1)
    with pytest.raises(UserError, match="percentages"):
        road(model, x, torch.rand(1, 32, 32), torch.ones(1, dtype=torch.long), torch.arange(1), percents=(0, 50))
