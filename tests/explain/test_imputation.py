"""ROAD's noisy linear imputation against hand-computed cases and the authors' sparse system."""

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from dpcam.explain.faithfulness import ROAD_PERCENTS, road_ranks
from dpcam.explain.imputation import linear_impute

IMAGE = torch.tensor(
    [
        [0.0, 0.2, 0.4, 0.1],
        [0.3, 0.9, 0.5, 0.7],
        [0.6, 0.8, 0.2, 0.0],
        [1.0, 0.4, 0.3, 0.5],
    ]
)


def _removed(*pixels, size=(4, 4)):
    m = torch.zeros(size, dtype=torch.bool)
    for r, c in pixels:
        m[r, c] = True
    return m


def test_imputation_by_hand():
    """Each removed pixel is the weighted mean of its neighbours inside the image (1/6 direct, 1/12 diagonal)."""
    x = torch.stack([IMAGE, 1 - IMAGE, 2 * IMAGE])[None].expand(4, 3, 4, 4)
    removed = torch.stack(
        [
            _removed((1, 1)),  # interior: (0.2 + 0.3 + 0.5 + 0.8) / 6 + (0.0 + 0.4 + 0.6 + 0.2) / 12 = 0.3 + 0.1
            _removed((0, 0)),  # corner: (0.2 / 6 + 0.3 / 6 + 0.9 / 12) / (1/6 + 1/6 + 1/12) = 1.9 / 5
            _removed((0, 2)),  # edge: ((0.2 + 0.1 + 0.5) / 6 + (0.9 + 0.7) / 12) / (3/6 + 2/12) = 3.2 / 8
            _removed((1, 1), (1, 2)),  # two unknowns: 12 v1 = 3.8 + 2 v2, 12 v2 = 3.7 + 2 v1
        ]
    )
    out = linear_impute(x, removed)
    expected = [{(1, 1): 0.4}, {(0, 0): 0.38}, {(0, 2): 0.4}, {(1, 1): 53 / 140, (1, 2): 13 / 35}]
    for i, values in enumerate(expected):
        want = IMAGE.clone()
        for (r, c), v in values.items():
            want[r, c] = v
        # affine channels are imputed affinely (the weights are normalised): 1 − x and 2x
        assert torch.allclose(out[i], torch.stack([want, 1 - want, 2 * want]), atol=1e-6), i
        assert torch.equal(out[i][:, ~removed[i]], x[i][:, ~removed[i]])  # kept pixels untouched


def test_a_linear_gradient_is_filled_exactly_away_from_the_edge():
    """A linear function is the weighted mean of its symmetric neighbours, so removed pixels with all eight
    neighbours inside the image are filled exactly (at the edge the mean is one-sided: see the corner above)."""
    r, c = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    x = torch.stack([0.1 + 0.02 * r + 0.03 * c, 0.9 - 0.05 * r, 0.2 + 0.04 * c])[None]
    removed = torch.zeros(1, 12, 12, dtype=torch.bool)
    removed[0, 3:9, 2:10] = True  # a block
    removed[0, 1, 1] = removed[0, 10, 5] = removed[0, 2, 10] = True  # and single pixels, none on the edge
    for solver in ("band", "sparse"):
        out = linear_impute(x, removed, solver=solver)
        assert torch.allclose(out, x, atol=1e-6), solver


def _authors_system(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The authors' formulation (road/imputations.py, setup_sparse_system), written out pixel by pixel: for
    each removed pixel i, −(Σ of its in-image weights) v_i + Σ_{removed neighbours} w v_n = −Σ_{kept} w x_n."""
    weights = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12)]
    weights += [((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]
    c, h, w = img.shape
    unknown = np.flatnonzero(removed)
    number = {p: k for k, p in enumerate(unknown)}
    a = scipy.sparse.lil_matrix((unknown.size, unknown.size))
    b = np.zeros((unknown.size, c))
    for k, p in enumerate(unknown):
        r, col = divmod(int(p), w)
        total = 0.0
        for (dr, dc), wt in weights:
            if 0 <= r + dr < h and 0 <= col + dc < w:
                total += wt
                q = (r + dr) * w + col + dc
                if q in number:
                    a[k, number[q]] = wt
                else:
                    b[k] -= wt * img[:, r + dr, col + dc]
        a[k, k] = -total
    return np.asarray(scipy.sparse.linalg.spsolve(a.tocsc(), b)).reshape(unknown.size, c)


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (32, 32)])
def test_both_solvers_equal_the_authors_sparse_system(size):
    """The band and sparse solvers (several masks per image, solved together) give the authors' system's solution
    to float32 precision, for compact (MoRF-like) and scattered (tie-broken) masks from 10 to 90 %."""
    h, w = size
    g = torch.Generator().manual_seed(h)
    x = torch.rand(2, 3, h, w, generator=g)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 1, 3, 3, generator=g), size=size, mode="bilinear")[:, 0]
    ranks = road_ranks(smooth, seed=0)
    ks = [p * h * w // 100 for p in ROAD_PERCENTS]
    masks = [ranks < k for k in ks] + [ranks >= h * w - k for k in ks]  # MoRF / LeRF of the smooth map
    masks += [torch.rand(2, h, w, generator=g) < 0.5]  # scattered
    removed = torch.stack(masks, dim=1)
    out = {s: linear_impute(x, removed, solver=s) for s in ("band", "sparse")}
    assert out["band"].shape == (2, removed.shape[1], 3, h, w)
    for i in range(2):
        for j in range(removed.shape[1]):
            m = removed[i, j].numpy()
            want = _authors_system(x[i].double().numpy(), m)
            for solver, got in out.items():
                imputed = got[i, j].permute(1, 2, 0).reshape(-1, 3)[m.reshape(-1)].double().numpy()
                assert np.abs(imputed - want).max() < 1e-6, (solver, i, j)
                assert torch.equal(got[i, j][:, ~removed[i, j]], x[i][:, ~removed[i, j]])


def test_imputation_needs_a_kept_pixel():
    with pytest.raises(ValueError, match="removes every pixel"):
        linear_impute(torch.rand(1, 3, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(linear_impute(x, torch.zeros(2, 4, 4, dtype=torch.bool)), x)  # nothing removed
