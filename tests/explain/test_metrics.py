"""Explanation metrics on hand-made models, maps and masks with known answers; streaming and registry."""

import math

import pytest
import scipy.stats
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from dpcam.errors import UserError
from dpcam.explain.gradcam import gradcam, random_init_copy
from dpcam.explain.metrics import (
    METRICS,
    DegeneracyStats,
    ExplainBatch,
    RunningMean,
    as_saved,
    average_ranks,
    blur_baseline,
    confidence_drop,
    default_tolerance,
    degenerate,
    deletion_insertion,
    dilate_disc,
    energy_pointing_game,
    finalize,
    get_metrics,
    map_agreement,
    pointing_game,
    saliency_ranks,
)
from dpcam.models import create_model


class ProbModel(nn.Module):
    """Two classes with p(class 1 | x) = f(x) exactly: logits = log([1 − f, f])."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.dummy = nn.Parameter(torch.zeros(()))  # so eval()/parameters() behave like a model

    def forward(self, x):
        p = self.f(x).clamp(0.0, 1.0)
        return torch.log(torch.stack([1 - p, p], dim=1).clamp_min(1e-12)) + 0 * self.dummy


def brightness(x):
    return x.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------ confidence


def _confidence_case():
    """4 images (3×4×4) with hand-computed Y, O: see the comments."""
    half = torch.zeros(4, 4)
    half[:, :2] = 1.0
    x = torch.stack([torch.full((3, 4, 4), v) for v in (0.8, 0.8, 0.6, 1.0)])
    maps = torch.stack([half, half, torch.ones(4, 4), torch.full((4, 4), 0.25)])
    target = torch.tensor([1, 0, 1, 1])
    labels = torch.tensor([1, 0, 1, 1])
    # img0: Y = .8, O = .4 → drop 50, no increase, score 40, x̃ predicted 0 ≠ 1
    # img1: Y = .2, O = .6 → drop 0, increase, score 60, x̃ predicted 0 = 0
    # img2: Y = O = .6 → drop 0, no increase (equal), score 60, x̃ predicted 1 = 1
    # img3: Y = 1, O = .25 → drop 75, no increase, score 25, x̃ predicted 0 ≠ 1
    return x, maps, target, labels


def test_confidence_drop_hand_computed():
    x, maps, target, labels = _confidence_case()
    out = confidence_drop(ProbModel(brightness), x, maps, target, labels)
    torch.testing.assert_close(out["Y"], torch.tensor([0.8, 0.2, 0.6, 1.0]))
    torch.testing.assert_close(out["O"], torch.tensor([0.4, 0.6, 0.6, 0.25]))
    torch.testing.assert_close(out["avg_drop_pct"], torch.tensor([50.0, 0.0, 0.0, 75.0]))
    assert out["increase_conf_pct"].tolist() == [0.0, 100.0, 0.0, 0.0]
    torch.testing.assert_close(out["masked_score_pct"], torch.tensor([40.0, 60.0, 60.0, 25.0]))
    assert out["masked_accuracy_pct"].tolist() == [0.0, 100.0, 100.0, 0.0]
    means = RunningMean().add(out).result()
    assert means["avg_drop_pct"] == pytest.approx(31.25, abs=1e-4)
    assert means["increase_conf_pct"] == 25.0
    assert means["masked_score_pct"] == pytest.approx(46.25, abs=1e-4)
    assert means["masked_accuracy_pct"] == 50.0


def test_confidence_streaming_and_probs_shortcut_agree():
    x, maps, target, labels = _confidence_case()
    model = ProbModel(brightness)
    whole = RunningMean().add(confidence_drop(model, x, maps, target, labels)).result()
    probs = torch.softmax(model(x), 1)
    run = RunningMean()
    for sl in (slice(0, 1), slice(1, 4)):
        run.add(confidence_drop(model, x[sl], maps[sl], target[sl], labels[sl], probs=probs[sl]))
    resumed = RunningMean()
    resumed.load_state_dict(run.state_dict())
    for k, v in whole.items():
        assert resumed.result()[k] == pytest.approx(v, abs=1e-5)
        assert finalize(run.sums, run.counts)[k] == pytest.approx(v, abs=1e-5)


def test_model_that_ignores_input_scores_no_drop_and_no_increase():
    x, maps, target, _ = _confidence_case()
    const = ProbModel(lambda x: torch.full((x.shape[0],), 0.7))
    out = confidence_drop(const, x, maps, target)
    assert torch.equal(out["avg_drop_pct"], torch.zeros(4))
    assert torch.equal(out["increase_conf_pct"], torch.zeros(4))  # O == Y is not an increase
    assert "masked_accuracy_pct" not in out  # no labels given


def test_zero_probability_gives_zero_drop_not_nan():
    x = torch.zeros(1, 3, 2, 2)  # brightness 0 → Y(class 1) = 0
    out = confidence_drop(ProbModel(brightness), x, torch.ones(1, 2, 2), torch.tensor([1]))
    assert out["avg_drop_pct"].tolist() == [0.0]


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


@pytest.mark.parametrize(
    "shape, sigma, kernel", [((2, 3, 16, 16), 5.0, 11), ((1, 3, 32, 24), 1.5, 7), ((3, 1, 5, 5), 2.0, 11)]
)
def test_blur_baseline_is_torchvisions_gaussian_blur(shape, sigma, kernel):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(5))
    k = min(kernel | 1, 2 * (min(shape[-2:]) - 1) + 1)  # shrunk to fit, as blur_baseline does
    torch.testing.assert_close(blur_baseline(x, sigma, kernel), gaussian_blur(x, [k, k], [sigma, sigma]))


def test_deletion_rejects_fewer_than_two_steps():
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(UserError, match="K >= 2"):
        deletion_insertion(ProbModel(brightness), x, torch.ones(1, 2, 2), torch.tensor([1]), steps=1)


def test_saliency_ranks_ties_in_raster_order():
    maps = torch.tensor([[[0.0, 5.0], [5.0, 1.0]]])
    assert saliency_ranks(maps).tolist() == [[[3, 0], [1, 2]]]


# ------------------------------------------------------------------------------ pointing games


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


# ------------------------------------------------------------------------------- map agreement


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


# ------------------------------------------------------------------------------ degenerate flag


def _probs_for(preds, num_classes, confidence=0.7):
    p = torch.full((len(preds), num_classes), (1 - confidence) / (num_classes - 1))
    p[torch.arange(len(preds)), torch.as_tensor(preds)] = confidence
    return p


def test_degenerate_healthy_model():
    labels = torch.arange(100) % 2
    preds = labels.clone()
    preds[:10] = 1 - preds[:10]  # 90% accurate, balanced
    out = degenerate(_probs_for(preds, 2, 0.9), labels)
    assert out["degenerate"] is False and out["reasons"] == []
    assert out["accuracy"] == pytest.approx(0.9) and out["majority_share"] == pytest.approx(0.5)
    assert out["pred_entropy"] == pytest.approx(1.0) and out["pred_histogram"] == [50, 50]


def test_degenerate_one_class_model():
    labels = torch.arange(100) % 2
    probs = torch.stack([torch.linspace(0.6, 0.9, 100), 1 - torch.linspace(0.6, 0.9, 100)], 1)  # always class 0
    out = degenerate(probs, labels)
    assert out["degenerate"] is True
    assert out["majority_share"] == 1.0 and out["majority_class"] == 0 and out["pred_entropy"] == 0.0
    assert any(r.startswith("one class") for r in out["reasons"]) and any(
        r.startswith("near chance") for r in out["reasons"]
    )
    assert not any(r.startswith("input-insensitive") for r in out["reasons"])


def test_degenerate_near_chance_only():
    i = torch.arange(160)
    labels = i % 4
    preds = (labels + (i // 4) % 4) % 4  # right for one block of 4 in every 16 → accuracy 0.25
    out = degenerate(_probs_for(preds, 4), labels)
    assert out["accuracy"] == pytest.approx(0.25) and out["chance"] == pytest.approx(0.25)
    assert [r.split(":")[0] for r in out["reasons"]] == ["near chance"]


def test_degenerate_input_insensitive_only():
    labels = torch.arange(100) % 2
    eps = torch.where(labels == 1, -1e-3, 1e-3)
    probs = torch.stack([0.5 + eps, 0.5 - eps], 1)  # always right, but outputs barely move
    out = degenerate(probs, labels)
    assert out["accuracy"] == 1.0
    assert out["input_sensitivity"] == pytest.approx(math.sqrt(2) * 1e-3, rel=1e-4)
    assert [r.split(":")[0] for r in out["reasons"]] == ["input-insensitive"]


def test_degenerate_imbalanced_data_followed_by_a_good_model_is_not_flagged():
    labels = torch.tensor([0] * 92 + [1] * 8)
    out = degenerate(_probs_for(labels, 2, 0.9), labels)
    assert out["chance"] == pytest.approx(0.92) and out["degenerate"] is False


def test_degeneracy_stats_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(50, 3, generator=gen), 1)
    labels = torch.randint(0, 3, (50,), generator=gen)
    stats = DegeneracyStats(3)
    for k in range(0, 50, 7):
        stats.add(probs[k : k + 7], labels[k : k + 7])
    restored = DegeneracyStats(3)
    restored.load_state_dict(stats.state_dict())
    one = degenerate(probs, labels)
    for key, v in restored.result().items():
        assert v == pytest.approx(one[key]), key
    with pytest.raises(UserError, match="0 images"):
        DegeneracyStats(3).result()


# ------------------------------------------------------------------------- registry, batch size


def test_registry_names_errors_and_needs():
    assert {
        "confidence",
        "masking-baselines",
        "deletion-insertion",
        "road",
        "pointing-game",
        "energy-pointing-game",
        "map-agreement",
        "randomisation",
    } <= set(METRICS)
    with pytest.raises(UserError, match="unknown explanation metric 'nope'; known: confidence"):
        get_metrics(["confidence", "nope"])
    batch = ExplainBatch(ProbModel(brightness), torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4), torch.tensor([1]))
    assert METRICS["pointing-game"].missing(batch) == ["masks"]
    with pytest.raises(UserError, match="needs masks"):
        METRICS["pointing-game"](batch)
    with pytest.raises(UserError, match="no option 'stepz'"):
        METRICS["deletion-insertion"](batch, stepz=3)
    for name in ("masking-baselines", "road"):  # their random numbers are seeded by the images' dataset indices
        assert METRICS[name].missing(batch) == ["indices"]


def test_all_metrics_identical_whatever_the_batch_size():
    model = create_model("smallcnn", 3, 32, seed=0)
    rand_model = random_init_copy(model, 1)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(10, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 3, (10,), generator=gen)
    masks = (torch.rand(10, 32, 32, generator=gen) > 0.9).float()
    masks[:3] = 0  # grade-0 images: no lesions
    reference = torch.rand(10, 32, 32, generator=gen)
    options = {"deletion-insertion": {"steps": 4}}

    def score(bs):
        run = RunningMean()
        for k in range(0, 10, bs):
            sl = slice(k, k + bs)
            maps, target, probs = gradcam(model, x[sl])
            rmaps, _, _ = gradcam(rand_model, x[sl], target=target)
            batch = ExplainBatch(
                model,
                x[sl],
                maps,
                target,
                probs=probs,
                labels=labels[sl],
                masks=masks[sl],
                reference_maps=reference[sl],
                random_maps=rmaps,
                indices=torch.arange(100, 110)[sl],
            )
            for metric in METRICS.values():
                run.add(*metric(batch, **options.get(metric.name, {})))
        return run

    a, b = score(10), score(3)
    assert a.counts == b.counts
    assert a.counts["pointing_game"] == 7 and a.counts["avg_drop_pct"] == 10
    for key, v in a.result().items():
        assert v is not None and b.result()[key] == pytest.approx(v, abs=1e-4), key


def test_running_means_are_exact_whatever_the_batching_and_order():
    """The mean of the same per-image values has the same bits for any batch size, order, merge or resume
    (float64 running sums were not: 0.1 + 0.2 + 0.3 depends on the grouping)."""
    g = torch.Generator().manual_seed(0)
    v = torch.cat(
        [torch.rand(997, generator=g) * 10.0 ** torch.randint(-12, 8, (997,), generator=g), torch.tensor([1e16, -1e16])]
    )
    exact = math.fsum(v.double().tolist()) / v.numel()
    results = set()
    for bs in (1, 7, 64, 1000):
        for order in (torch.arange(v.numel()), torch.randperm(v.numel(), generator=g)):
            run = RunningMean()
            for k in range(0, v.numel(), bs):
                run.add({"m": v[order[k : k + bs]]})
            results.add(run.result()["m"])
    half = RunningMean().add({"m": v[:500]})
    resumed = RunningMean()
    resumed.load_state_dict(half.state_dict())
    resumed.merge(RunningMean().add({"m": v[500:]}))
    results.add(resumed.result()["m"])
    assert results == {exact}
