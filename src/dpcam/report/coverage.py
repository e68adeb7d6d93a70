"""How many degrees of freedom an interval over few seeds may claim: the calibration behind :mod:`.paired`.

A paired difference D̂ (mean over S seeds of each seed's mean over images) has two variance parts
(docs/verdict.md, "The interval"):

- ``A``, the seed part, estimated from the S per-seed differences: ``A ~ E[A]·χ²_k / k`` with
  k = S − 1 degrees of freedom, and
- ``B``, the image part the seeds share (all seeds score the same test images), estimated from
  hundreds of images: known, to a good approximation.

The interval is D̂ ± t_{1−α/2, ν}·√(A + B). Satterthwaite's ν = (A + B)² / (A²/k) is exact in the
limits (A ≫ B: Student t on k df; A ≪ B: normal) but, with ν computed from the same noisy A, the
interval under-covers in between: with 3 seeds its coverage falls to 92.2 % at a seed share of
about 90 % (:func:`error_rate`). dpcam therefore computes ν with the seed part counted
``c(k, α)`` times, ν = (c·A + B)² / ((c·A)²/k + B²/(n − 1)), and chooses c, per k and level, as
the smallest value whose exact error rate under the normal model is at most α at every seed
share w = E[A] / (E[A] + B) (:func:`calibrate`; the table :data:`INFLATION` is its output, written
by ``scripts/calibrate_intervals.py`` and checked by tests/report/test_coverage.py). The interval
then covers at least 1 − α whatever the (unknown) ratio of seed to image variance, and at most
about 1 − α + 0.016 with 3 seeds (0.007 with 5). Calibrating per level keeps p-values valid in the
tails that a multiplicity correction uses: c calibrated at 5 % alone lets a 0.1 % test err 6 times
too often with 3 seeds.
"""

from __future__ import annotations

import math

import numpy as np

# the seed shares w at which the error rate is checked (the worst share lies between 0.3 and 0.99)
SHARES = tuple(np.round(np.concatenate([np.linspace(0.02, 0.9, 23), np.linspace(0.91, 0.995, 12)]), 4))
# levels α of the table (two-sided error rates); between them c is interpolated in log α
ALPHAS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4, 1e-5)

# c(k, α): written by scripts/calibrate_intervals.py (k = S − 1 seed degrees of freedom); rows k = 1..9
INFLATION: dict[int, tuple[float, ...]] = {
    1: (
        1.443,
        3.949,
        7.198,
        14.014,
        42.357,
        111.765,
        317.917,
        1377.835,
        4361.112,
        14233.943,
        69869.641,
        238517.476,
        15332083.256,
    ),
    2: (1.258, 2.073, 2.935, 4.006, 5.894, 8.14, 11.655, 19.782, 30.662, 48.857, 93.86, 157.235, 967.982),
    3: (1.243, 1.643, 2.1, 2.64, 3.485, 4.238, 5.185, 6.901, 8.713, 11.179, 15.906, 21.126, 59.297),
    4: (1.265, 1.456, 1.757, 2.104, 2.635, 3.091, 3.596, 4.385, 5.13, 6.041, 7.596, 9.118, 17.782),
    5: (1.303, 1.357, 1.573, 1.825, 2.203, 2.524, 2.875, 3.385, 3.817, 4.319, 5.113, 5.84, 9.425),
    6: (1.348, 1.297, 1.46, 1.655, 1.946, 2.19, 2.454, 2.836, 3.148, 3.483, 3.988, 4.43, 6.418),
    7: (1.398, 1.261, 1.385, 1.543, 1.777, 1.972, 2.182, 2.483, 2.728, 2.988, 3.356, 3.664, 4.964),
    8: (1.452, 1.237, 1.332, 1.463, 1.658, 1.819, 1.992, 2.239, 2.439, 2.651, 2.948, 3.186, 4.127),
    9: (1.508, 1.222, 1.293, 1.403, 1.57, 1.707, 1.854, 2.062, 2.229, 2.407, 2.654, 2.853, 3.589),
}


def _grid(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantile points x of χ²_k and their probability weights, fine in the lower tail (where errors come from)."""
    from scipy import stats

    edges = np.concatenate([[0.0], np.logspace(-14, 0, 4000)])
    return stats.chi2.ppf((edges[1:] + edges[:-1]) / 2, k), np.diff(edges)


def error_rate(w: float, k: int, c: float, alpha: float, images: float = math.inf) -> float:
    """Exact probability that the level-(1 − α) interval misses the true difference, under the normal model.

    Normalised so that Var(D̂) = 1: the seed part A = w·X/k with X ~ χ²_k, the image part B = 1 − w
    (known), ν as in the module docstring with the seed part counted ``c`` times and ``images`` − 1
    degrees of freedom for the image part.
    """
    from scipy import stats

    x, p = _grid(k)
    a, b = w * x / k, 1.0 - w
    nu = _nu(a, b, k, c, images)
    q = stats.t.ppf(1 - alpha / 2, nu)
    return float(np.sum(p * 2 * stats.norm.sf(q * np.sqrt(a + b))))


def _nu(a, b, k: int, c: float, images: float):
    """Satterthwaite's degrees of freedom with the seed part counted ``c`` times."""
    ca = c * np.asarray(a, dtype=float)
    img = 0.0 if not math.isfinite(images) else np.asarray(b, dtype=float) ** 2 / max(images - 1, 1)
    den = ca**2 / k + img
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = np.where(den > 0, (ca + b) ** 2 / np.where(den > 0, den, 1), np.inf)
    return np.clip(nu, k, 1e7)


def calibrate(k: int, alpha: float, shares=SHARES) -> float:
    """The smallest inflation c ≥ 1 whose interval errs at most α at every seed share (the table's entries)."""
    from scipy import optimize

    def excess(c: float) -> float:
        return max(error_rate(w, k, c, alpha) for w in shares) - alpha

    if excess(1.0) <= 0:
        return 1.0
    hi = 2.0
    while excess(hi) > 0:
        hi *= 2
    return float(optimize.brentq(excess, hi / 2 if hi > 2 else 1.0, hi, xtol=1e-3, rtol=1e-4))


def inflation(k: int, alpha: float) -> float:
    """c(k, α) from :data:`INFLATION`, interpolated linearly in log α; k beyond the table takes its last row
    (at the levels tests use, α ≤ 0.2, c falls with k, so that is conservative), α outside the table its nearest
    end."""
    if k < 1:
        raise ValueError("the seed part needs at least 2 seeds (k = S − 1 >= 1)")
    row = INFLATION[min(k, max(INFLATION))]
    logs = np.log(ALPHAS)[::-1]  # increasing
    return float(np.interp(math.log(min(max(alpha, ALPHAS[-1]), ALPHAS[0])), logs, np.asarray(row)[::-1]))


def degrees_of_freedom(a: float, b: float, k: int, images: int, alpha: float) -> float:
    """ν of the level-(1 − α) interval for seed part ``a`` (k df) and image part ``b`` (``images`` − 1 df)."""
    return float(_nu(a, b, k, inflation(k, alpha), images))
