"""Pointing games on hand-made maps and masks with known answers."""

import pytest
import torch

from dpcam.errors import UserError
from dpcam.explain.inputs import as_saved
from dpcam.explain.localisation import default_tolerance, dilate_disc, energy_pointing_game, pointing_game


def test_pointing_game_with_tolerance_and_validity():
    maps = torch.zeros(4, 5, 5)
    maps[:, 2, 2] = 1.0
    masks = torch.zeros(4, 5, 5)
    masks[0, 2, 2] = 1  # the maximum itself
    masks[1, 2, 4] = 1  # two pixels right of the maximum (Euclidean distance 2)
    masks[2, 4, 4] = 1  # two down and two right (Euclidean distance √8 ≈ 2.83, Chebyshev 2)
    # image 3: empty mask (grade 0) → not valid
    for tol, expected in ((0, [1, 0, 0, 0]), (1, [1, 0, 0, 0]), (2, [1, 1, 0, 0]), (3, [1, 1, 1, 0])):
        hits, valid = pointing_game(maps, masks, tolerance=tol)
        assert hits.tolist() == expected, tol
        assert valid.tolist() == [True, True, True, False]
    assert default_tolerance(64, 64) == 4 and default_tolerance(224, 224) == 15
    with pytest.raises(UserError, match="tolerance"):
        pointing_game(maps, masks, tolerance=-1)


def test_pointing_game_tolerance_is_a_disc_not_a_square():
    """Zhang et al.'s tolerance: Euclidean distance ≤ t. The corner of the (2t+1)² square is outside the disc
    (failed before: the mask was dilated by a square, Chebyshev distance ≤ t)."""
    t = 15
    maps = torch.zeros(2, 64, 64)
    maps[:, 40, 40] = 1.0
    masks = torch.zeros(2, 64, 64)
    masks[0, 40 - 11, 40 - 11] = 1  # Chebyshev 11, Euclidean 15.56 > 15: a miss
    masks[1, 40 - 9, 40 - 12] = 1  # Euclidean exactly 15: a hit
    assert pointing_game(maps, masks, tolerance=t)[0].tolist() == [0.0, 1.0]


def test_disc_dilation_equals_brute_force_distances():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 23, 17, generator=g) > 0.985).float()
    masks[2] = 0
    ys, xs = torch.meshgrid(torch.arange(23), torch.arange(17), indexing="ij")
    for t in (0, 1, 2, 3, 5, 30):
        got = dilate_disc(masks, t)
        for b in range(3):
            pts = masks[b].nonzero()
            if len(pts) == 0:
                assert not got[b].any()
                continue
            d2 = (ys[..., None] - pts[:, 0]) ** 2 + (xs[..., None] - pts[:, 1]) ** 2
            assert torch.equal(got[b], (d2 <= t * t).any(-1)), (t, b)


def test_pointing_game_counts_a_hit_when_any_pixel_of_a_flat_maximum_is_inside():
    """An upsampled coarse map has plateaus: every maximal pixel counts, not the first in raster order
    (failed before: argmax picked the plateau's top-left pixel, outside the mask)."""
    maps = torch.zeros(1, 8, 8)
    maps[:, 1:4, 1:7] = 1.0  # a flat maximum over rows 1-3, columns 1-6
    masks = torch.zeros(1, 8, 8)
    masks[:, 3:5, 6] = 1  # lesion under the plateau's bottom-right end; (1, 1) is 2.8 px from it
    hits, valid = pointing_game(maps, masks, tolerance=0)
    assert hits.tolist() == [1.0] and valid.tolist() == [True]
    noisy = maps * (1 - 1e-5)
    noisy[0, 1, 1] = 1.0  # float32 noise on the plateau makes one pixel the maximum ...
    assert pointing_game(noisy, masks, tolerance=0)[0].tolist() == [0.0]
    assert pointing_game(as_saved(noisy), masks, tolerance=0)[0].tolist() == [1.0]  # ... the saved map ties it


def test_a_constant_map_points_nowhere_and_is_a_miss():
    """All zeros (the ReLU zeroed the map) or any constant map: a miss, counted when the mask is non-empty
    (failed before: argmax "pointed" at the top-left pixel, a hit when a lesion lay there)."""
    corner = torch.zeros(3, 5, 5)
    corner[:2, 0, 0] = 1
    maps = torch.stack([torch.zeros(5, 5), torch.full((5, 5), 0.5), torch.zeros(5, 5)])
    hits, valid = pointing_game(maps, corner, tolerance=0)
    assert hits.tolist() == [0.0, 0.0, 0.0] and valid.tolist() == [True, True, False]
    full = torch.ones(3, 5, 5)
    assert pointing_game(maps, full, tolerance=2)[0].tolist() == [0.0, 0.0, 0.0]


def test_energy_pointing_game_exact():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 0]]]).float()
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(energy_pointing_game(maps[:1], torch.ones(1, 2, 2)), torch.tensor([1.0]))
