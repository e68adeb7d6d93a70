import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from dpcam.report.paired import Difference, correct, holm_rejects, paired_mean, paired_statistic, quadratic_kappa


def test_identical_runs_differ_by_zero_and_are_indistinguishable():
    a = np.random.default_rng(0).random(100)
    d = paired_mean([(a, a), (a, a), (a, a)])
    assert d.mean == 0 and d.lo == 0 and d.hi == 0 and not d.distinguishable and d.p == 1.0


def test_a_clear_shift_is_distinguishable_in_the_right_direction():
    rng = np.random.default_rng(1)
    pairs = [(b - 5 + rng.normal(0, 1, 200), b) for b in (rng.normal(50, 10, 200) for _ in range(3))]
    worse = paired_mean(pairs, better="higher")
    assert worse.mean == pytest.approx(-5, abs=0.5) and worse.worse and not worse.improved
    assert paired_mean(pairs, better="lower").improved  # lower is better: the same shift is an improvement


def test_invalid_images_are_left_out_pairwise():
    a, b = np.array([1.0, np.nan, 3.0, 4.0]), np.array([0.0, 5.0, np.nan, 3.0])
    d = paired_mean([(a, b)])
    assert d.mean == pytest.approx(1.0) and d.images == 2 and "one seed" in d.note


def test_unequal_image_arrays_are_refused_never_cut():
    with pytest.raises(ValueError, match="same images"):
        paired_mean([(np.zeros(5), np.zeros(5)), (np.zeros(4), np.zeros(4))])


def test_the_variance_parts_are_the_seed_spread_and_the_image_covariance_the_seeds_share():
    """Hand-computed: two seeds, three images, no missing values."""
    d1, d2 = np.array([1.0, 2.0, 6.0]), np.array([2.0, 2.0, 5.0])  # per-image differences of seeds 0 and 1
    d = paired_mean([(d1, np.zeros(3)), (d2, np.zeros(3))])
    assert d.mean == pytest.approx(3.0) and d.per_seed == [3.0, 3.0]
    assert d.a == pytest.approx(0.0)  # the seeds agree exactly
    # covariance of the two seeds' means over images: Σ (d1 − 3)(d2 − 3) / (N (N − 1)) = (2 + 1 + 6) / 6
    assert d.b == pytest.approx(9 / 6)
    assert d.se == pytest.approx(math.sqrt(9 / 6))


# ---------------------------------------------------------------- coverage: the simulation of the issue

# (seed sd, image sd, seed × image sd) of the per-image difference d_s(i) = μ + a_s + b_i + c_si, for 200 images;
# from all-seed to all-image: the seed share of Var(D̂) ≈ 0.99, 0.94, 0.75, 0.5, 0.2 and 0.05 with 3 seeds
# (the default study's 76 cells, estimated: seed share 0.003 to 1.0, median 0.91; a fresh clone of 2bd02b5, 2026-12-07)
SCENARIOS = [(0.1, 0.5, 8.0), (1.0, 2.0, 2.0), (0.4, 2.0, 5.0), (0.3, 3.0, 3.0), (0.15, 4.0, 4.0), (0.05, 5.0, 2.0)]
TRIALS = 2500


def simulated_coverage(interval, seeds: int, scenario, trials: int = TRIALS, images: int = 200, seed: int = 0):
    """Share of ``trials`` simulated studies whose interval (``interval(pairs) -> (lo, hi)``) covers μ = 1."""
    sa, sb, sc = scenario
    rng = np.random.default_rng(seed)
    covered = 0
    for _ in range(trials):
        b = rng.normal(0, sb, images)
        pairs = []
        for _ in range(seeds):
            ref = rng.normal(0, 1, images)
            pairs.append((ref + 1.0 + rng.normal(0, sa) + b + rng.normal(0, sc, images), ref))
        lo, hi = interval(pairs)
        covered += lo <= 1.0 <= hi
    return covered / trials


def _dpcam(pairs):
    d = paired_mean(pairs)
    return d.lo, d.hi


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_interval_covers_95_percent_at_every_ratio_of_seed_image_and_interaction_variance(seeds, scenario):
    """2500 simulated studies per case: Monte Carlo error of a coverage near 95 % is ± 0.44 points (1 SE), so the
    band [94, 97] rejects the previous method (92–93 % where seeds and images both matter) and any interval
    too wide to be useful (t on S − 1 df for everything: 97.5–100 %)."""
    assert 0.94 <= simulated_coverage(_dpcam, seeds, scenario) <= 0.97


def test_quadratic_kappa_is_sklearns():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    counts = np.bincount(y * 5 + p, minlength=25).astype(float)
    assert quadratic_kappa(counts, 5) == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"))


def test_paired_kappa_difference():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, 400)
    good = np.where(rng.random(400) < 0.8, y, rng.integers(0, 5, 400))
    bad = np.where(rng.random(400) < 0.3, y, rng.integers(0, 5, 400))
    d = paired_statistic([(bad, good, y)] * 2, lambda c: quadratic_kappa(c, 5), 5)
    want = cohen_kappa_score(y, bad, weights="quadratic") - cohen_kappa_score(y, good, weights="quadratic")
    assert d.mean == pytest.approx(want) and d.worse
    assert d.a == 0 and d.b > 0  # two identical seeds: no seed spread, the image part alone


# ---------------------------------------------------------------- p-values, margins, multiplicity


def _diff(mean, a, b, seeds=3, images=200, better="higher"):
    d = Difference(mean, None, None, seeds, images, [], better, "", a, b)
    d.lo, d.hi = d.interval()
    return d


def test_the_p_value_is_where_the_interval_reaches_zero():
    d = _diff(2.0, 0.3, 0.2)
    lo, hi = d.interval(d.p)
    assert lo == pytest.approx(0.0, abs=1e-4)
    assert (d.p < 0.05) == d.distinguishable
    assert d.p_shifted(d.hi) == pytest.approx(0.05, rel=1e-3)  # the 95 % interval's end has p = 0.05


def test_non_inferiority_needs_the_whole_interval_inside_the_margin_whatever_the_point():
    small_loss_wide = _diff(-0.5, 4.0, 1.0)  # higher is better; a small loss, but a wide interval
    assert not small_loss_wide.noninferior(2.0)  # reaches past −2: not shown
    precise = _diff(-0.5, 0.01, 0.01)
    assert precise.noninferior(2.0) and not precise.noninferior(0.5)
    lower_better = _diff(+0.3, 0.01, 0.01, better="lower")  # a rise of a lower-is-better metric is a loss
    assert lower_better.worst_end() == pytest.approx(lower_better.hi)
    assert lower_better.noninferior(1.0) and not lower_better.noninferior(0.3)


def test_the_detectable_loss_is_t_plus_t_power_standard_errors():
    from scipy import stats

    d = _diff(0.0, 0.0, 1.0, seeds=1, images=10**6)
    assert d.detectable() == pytest.approx(stats.norm.ppf(0.975) + stats.norm.ppf(0.8), rel=1e-3)


def test_holm_and_bh_mark_what_survives_the_family():
    ds = [_diff(m, 0.0, 1.0, seeds=1, images=10**6) for m in (5.0, 2.3, 2.1, 0.1)]  # p ≈ 6e-7, .021, .036, .92
    assert correct(ds, "holm") == 4
    assert [d.mark for d in ds] == ["▲", "", "", ""]  # .021 > .05/3
    correct(ds, "bh")
    assert [d.mark for d in ds] == ["▲", "▲", "▲", ""]  # .036 <= 3 × .05 / 4
    assert holm_rejects([0.001, None, 0.02, 0.03]) == [True, False, True, True]  # 3 tests: .0167, .025, .05


def test_calibration_error_of_summed_features_is_train_jsons_and_a_recall_is_the_accuracy_of_one_class():
    from dpcam.records import calibration_error, calibration_features
    from dpcam.train.fit import calibration_metrics, classification_metrics

    # confidences 0.9 (right), 0.9 (wrong), 0.6, 0.6 (both right): bins 13 and 9, gaps +0.8 and −0.8 → ECE 1.6 / 4
    prob = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    label = np.array([0, 0, 0, 1])
    ece = float(calibration_error(calibration_features(prob, label, 15).sum(0), 15))
    assert ece == pytest.approx(0.4) and calibration_metrics(prob, label, "t") == pytest.approx(
        {"t_ece": 0.4, "t_confidence": 0.75}
    )
    got = classification_metrics(prob.argmax(1), label, 3, "t")["t_recall"]
    assert got == [pytest.approx(2 / 3), 1.0, None]  # class 2 has no test image
