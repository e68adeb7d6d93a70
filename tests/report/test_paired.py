import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from dpcam.report.paired import paired_mean, paired_statistic, quadratic_kappa


def test_identical_runs_differ_by_zero_and_are_indistinguishable():
    a = np.random.default_rng(0).random(100)
    d = paired_mean([(a, a), (a, a), (a, a)])
    assert d.mean == 0 and d.lo == 0 and d.hi == 0 and not d.distinguishable


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


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Seeds differ (training randomness) and images differ (sampling): the interval must cover both."""
    rng = np.random.default_rng(2)
    covered, trials = 0, 200
    for _ in range(trials):
        image_effect = rng.normal(0, 2, 150)  # the difference varies by image; true mean difference 1.0
        pairs = []
        for _ in range(3):
            seed_effect = rng.normal(0, 0.5)
            base = rng.normal(0, 1, 150)
            pairs.append((base + 1.0 + image_effect + seed_effect + rng.normal(0, 1, 150), base))
        d = paired_mean(pairs, n_boot=400)
        covered += d.lo <= 1.0 <= d.hi
    assert 0.9 <= covered / trials <= 1.0


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
