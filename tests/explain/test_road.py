"""ROAD's noisy linear imputation against hand-computed cases and the authors' sparse system; ROAD's curves on toy
models with known evidence; the masking baselines (mask sensitivity, random maps) of the matched comparisons."""

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from dpcam.errors import UserError
from dpcam.explain.metrics import (
    METRICS,
    ROAD_PERCENTS,
    ExplainBatch,
    confidence_drop,
    linear_impute,
    masking_baselines,
    random_maps,
    road,
    road_ranks,
)
from tests.explain.test_metrics import ProbModel, brightness

# ------------------------------------------------------------------------------ imputation

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


# ------------------------------------------------------------------------------------ ROAD


REGION = (slice(4, 12), slice(4, 12))  # the toy model's evidence: an 8×8 square
ELSEWHERE = (slice(20, 28), slice(18, 26))


def region_model():
    """p(class 1 | x) = the mean brightness of REGION: the evidence is exactly there."""
    return ProbModel(lambda x: x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)))


def _bump(where, size=32):
    m = torch.zeros(size, size)
    m[where] = 1.0
    return torch.nn.functional.avg_pool2d(m[None, None], 5, 1, 2)[0, 0]  # a smooth bump, zeros far away


def _scene(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.05 * torch.rand(b, 3, 32, 32, generator=g)  # dark, textured background
    x[:, :, REGION[0], REGION[1]] = 0.85 + 0.1 * torch.rand(b, 3, 8, 8, generator=g)  # the bright evidence
    return x


def test_road_of_a_model_that_ignores_the_image_has_equal_morf_and_lerf():
    model = ProbModel(lambda x: torch.full((x.shape[0],), 0.7))
    x = _scene()
    maps = _bump(REGION)[None].expand(4, 32, 32)
    out = road(model, x, maps, torch.ones(4, dtype=torch.long), torch.arange(4), return_curves=True)
    assert torch.equal(out["road_morf_auc"], out["road_lerf_auc"]) and torch.all(out["road_gap"] == 0)
    assert torch.allclose(out["morf_curve"], torch.full((len(ROAD_PERCENTS), 4), 0.7))


def test_road_prefers_the_map_that_points_at_the_evidence():
    """MoRF removes the evidence first for the map pointing at it (the imputation cannot restore it from the dark
    surroundings); the map pointing elsewhere removes the evidence late, and then scattered (tie-broken)."""
    model, x, target, idx = region_model(), _scene(), torch.ones(4, dtype=torch.long), torch.arange(4)
    right = road(model, x, _bump(REGION)[None].expand(4, 32, 32), target, idx)
    wrong = road(model, x, _bump(ELSEWHERE)[None].expand(4, 32, 32), target, idx)
    assert torch.all(right["road_morf_auc"] < wrong["road_morf_auc"] - 0.2)
    assert torch.all(right["road_lerf_auc"] > wrong["road_lerf_auc"])
    assert torch.all(right["road_gap"] > wrong["road_gap"] + 0.2)
    assert torch.allclose(right["road_gap"], right["road_lerf_auc"] - right["road_morf_auc"], atol=1e-6)


def test_road_is_reproducible_whatever_the_batch_and_seeded():
    model, x, target = region_model(), _scene(6), torch.ones(6, dtype=torch.long)
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
    model, x = region_model(), _scene(1)
    with pytest.raises(UserError, match="percentages"):
        road(model, x, torch.rand(1, 32, 32), torch.ones(1, dtype=torch.long), torch.arange(1), percents=(0, 50))


# ------------------------------------------------------------------------------ masking baselines


def test_random_map_is_a_seeded_permutation_of_each_map():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([7, 8, 9])
    r = random_maps(maps, idx, seed=0)
    for i in range(3):
        assert torch.equal(r[i].flatten().sort().values, maps[i].flatten().sort().values)  # the same values
        assert not torch.equal(r[i], maps[i])
    assert torch.equal(r, random_maps(maps, idx, seed=0))  # reruns are identical
    assert torch.equal(r[1:2], random_maps(maps[1:2], idx[1:2], seed=0))  # whatever the batch
    assert not torch.equal(r, random_maps(maps, idx, seed=1))
    assert not torch.equal(r[0], random_maps(maps[:1], torch.tensor([8]), seed=0)[0])  # seeded by the index


def test_mask_sensitivity_by_hand():
    """p = mean brightness: the constant map m̄ gives O_u = m̄ · Y, so the sensitivity is 100 · (1 − m̄)."""
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = masking_baselines(ProbModel(brightness), x, maps, torch.ones(3, dtype=torch.long), torch.arange(3))
    mean = maps.mean(dim=(1, 2))
    assert torch.allclose(out["Y"], brightness(x))
    assert torch.allclose(out["O_uniform"], mean * brightness(x), atol=1e-6)
    assert torch.allclose(out["mask_sensitivity_pct"], 100 * (1 - mean), atol=1e-4)
    # on a uniform image this model sees only a map's mass: the random map then scores like the constant one
    flat = masking_baselines(
        ProbModel(brightness), torch.full_like(x, 0.6), maps, torch.ones(3).long(), torch.arange(3)
    )
    assert torch.allclose(flat["O_random"], flat["O_uniform"], atol=1e-6)


def test_mask_sensitivity_is_zero_for_a_model_blind_to_the_intensity_scale():
    """p = f(x / mean x): dimming the image by any constant changes nothing, so the constant map costs nothing
    (up to float rounding), while the paper's Average Drop of an informative map still moves."""

    def contrast(x):
        z = x / x.mean(dim=(1, 2, 3), keepdim=True)
        return torch.sigmoid(3 * (z[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)) - 1))

    model, x, idx = ProbModel(contrast), _scene(), torch.arange(4)
    target = torch.ones(4, dtype=torch.long)
    maps = _bump(ELSEWHERE)[None].expand(4, 32, 32)
    out = masking_baselines(model, x, maps, target, idx)
    assert torch.all(out["mask_sensitivity_pct"] < 1e-4)
    assert torch.all(confidence_drop(model, x, maps, target)["avg_drop_pct"] > 10)


def test_random_map_baseline_differs_from_the_real_map_and_is_reproducible():
    """The region model keeps its evidence under the map that covers it (no drop) and loses most of it under
    the same values in random places."""
    model, x, idx = region_model(), _scene(), torch.arange(10, 14)
    target = torch.ones(4, dtype=torch.long)
    maps = torch.zeros(4, 32, 32)
    maps[:, REGION[0], REGION[1]] = 1.0
    real = confidence_drop(model, x, maps, target)
    out = masking_baselines(model, x, maps, target, idx)
    assert torch.all(real["avg_drop_pct"] < 1e-4) and torch.all(out["avg_drop_random_pct"] > 80)
    assert torch.all(out["masked_score_random_pct"] < real["masked_score_pct"] - 50)
    assert torch.all(out["increase_conf_random_pct"] == 0)
    again = masking_baselines(model, x, maps, target, idx)
    for key in out:
        assert torch.equal(out[key], again[key]), key


def test_registry_entries_of_the_new_metrics():
    model, x = region_model(), _scene(2)
    maps = _bump(REGION)[None].expand(2, 32, 32).contiguous()
    target = torch.ones(2, dtype=torch.long)
    batch = ExplainBatch(model, x, maps, target, labels=target, indices=torch.tensor([3, 4]))
    values, valid = METRICS["confidence"](batch)
    assert torch.allclose(values["confidence_y"], region_model()(x).softmax(1)[:, 1])
    values, valid = METRICS["masking-baselines"](batch, seed=0)
    assert set(values) == set(METRICS["masking-baselines"].keys) and valid == {}
    direct = masking_baselines(model, x, maps, target, batch.indices, 0)
    assert all(torch.equal(values[k], direct[k]) for k in values)
    values, valid = METRICS["road"](batch, seed=0)
    assert set(values) == {"road_morf_auc", "road_lerf_auc", "road_gap"} and valid == {}
    direct = road(model, x, maps, target, batch.indices, 0)
    assert all(torch.equal(values[k], direct[k]) for k in values)
