"""Paired differences to ε = ∞: the same seed, the same test images, with a 95 % interval.

For a metric m, a private configuration (e.g. Gaussian ε = 1) and its reference (ε = ∞):

    d_s(i) = m(ε, seed s, image i) − m(∞, seed s, image i)         (images both runs scored validly)
    D̂      = mean over seeds s of mean over images i of d_s(i)

D̂ estimates the difference a team would see on new test images with a new training seed, so its
uncertainty has two sources, both in the interval:

- **training randomness**: the per-seed differences D̂_s vary; its standard error is
  SE_seed = sd(D̂_s) / √S (needs S ≥ 2 seeds);
- **test-image sampling**: a paired bootstrap over test images (the same resampled images for the
  ε and ∞ runs, and for every seed, since all runs of a study score the same test images);
  SE_img = the bootstrap standard deviation of D̂.

SE² = SE_seed² + SE_img² (a little conservative: image noise inside each seed's D̂_s is counted in
both) and the interval is D̂ ± t_{0.975, ν}·SE with ν = (S − 1)·(SE/SE_seed)⁴ (Welch–Satterthwaite:
only the seed part has finite degrees of freedom). With one seed the interval covers test-image
sampling only, and says so. A difference is *distinguishable from zero* when its interval excludes 0.

Non-additive metrics (quadratic weighted kappa) use the same scheme with the statistic recomputed
on each bootstrap resample (multinomial weights, vectorised).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 2000
SEED = 20261130  # the bootstrap's own seed: the report is deterministic


@dataclass
class Difference:
    """One paired difference (ε − ∞) with its interval; ``better`` says which sign is an improvement."""

    mean: float | None
    lo: float | None
    hi: float | None
    seeds: int
    images: int
    per_seed: list[float] = field(default_factory=list)
    better: str = "higher"  # "higher" or "lower": the direction in which the metric improves
    note: str = ""

    @property
    def distinguishable(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    @property
    def worse(self) -> bool:
        """Distinguishably worse than the reference."""
        if not self.distinguishable:
            return False
        return self.hi < 0 if self.better == "higher" else self.lo > 0

    @property
    def improved(self) -> bool:
        """Distinguishably better than the reference."""
        return self.distinguishable and not self.worse

    def words(self, decimals: int = 3) -> str:
        """``-0.052 [-0.081, -0.023]`` or ``—``."""
        if self.mean is None:
            return "—"
        f = f"{{:+.{decimals}f}}"
        if self.lo is None:
            return f.format(self.mean) + " (no interval)"
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def _weights(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resampling counts: (b, n), each row a multinomial draw of n out of n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)


def _interval(point: float, per_seed: np.ndarray, boot: np.ndarray, level: float) -> tuple[float, float, str]:
    from scipy import stats

    se_img = float(np.std(boot, ddof=1)) if boot.size > 1 else 0.0
    s = per_seed.size
    if s < 2:
        half = stats.norm.ppf((1 + level) / 2) * se_img
        return point - half, point + half, "one seed: the interval covers test-image sampling only"
    se_seed = float(np.std(per_seed, ddof=1) / math.sqrt(s))
    se = math.sqrt(se_seed**2 + se_img**2)
    if se == 0:
        return point, point, ""
    df = (s - 1) * (se / se_seed) ** 4 if se_seed > 0 else math.inf
    q = stats.t.ppf((1 + level) / 2, min(df, 1e6))
    return point - q * se, point + q * se, ""


def paired_mean(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    better: str = "higher",
    level: float = LEVEL,
    n_boot: int = BOOTSTRAP,
) -> Difference:
    """D̂ of a per-image metric: ``pairs`` holds per seed (ε values, ∞ values), aligned by image, NaN = not valid.

    Every seed's arrays must cover the same images in the same order (the study's scored test images).
    """
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in pairs]
    if not pairs:
        return Difference(None, None, None, 0, 0, better=better, note="no paired runs")
    n = pairs[0][0].size
    if any(a.size != n or b.size != n for a, b in pairs):
        raise ValueError("every seed's runs must score the same images")
    d = np.stack([a - b for a, b in pairs])  # (S, N)
    valid = np.isfinite(d)
    if not valid.any(axis=1).all():
        return Difference(None, None, None, len(pairs), 0, better=better, note="no image with a valid value")
    per_seed = np.array([row[ok].mean() for row, ok in zip(d, valid)])
    point = float(per_seed.mean())
    w = _weights(n, n_boot, np.random.default_rng(SEED))
    dz = np.where(valid, d, 0.0)
    num, den = w @ dz.T, w @ valid.T.astype(np.float64)  # (B, S)
    boot = np.nanmean(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan), axis=1)
    lo, hi, note = _interval(point, per_seed, boot[np.isfinite(boot)], level)
    return Difference(point, lo, hi, len(pairs), int(valid.any(axis=0).sum()), per_seed.tolist(), better, note)


def quadratic_kappa(counts: np.ndarray, k: int) -> np.ndarray:
    """Cohen's quadratic weighted kappa from confusion counts ``(..., k*k)`` (row = label, column = prediction)."""
    c = counts.reshape(*counts.shape[:-1], k, k)
    total = c.sum(axis=(-1, -2), keepdims=True)
    rows, cols = c.sum(axis=-1, keepdims=True), c.sum(axis=-2, keepdims=True)
    expected = rows * cols / np.where(total > 0, total, 1)
    i, j = np.indices((k, k))
    wq = (i - j) ** 2 / max((k - 1) ** 2, 1)
    num, den = (wq * c).sum(axis=(-1, -2)), (wq * expected).sum(axis=(-1, -2))
    return np.where(den > 0, 1 - num / np.where(den > 0, den, 1), 0.0)


def paired_statistic(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    statistic: Callable[[np.ndarray], np.ndarray],
    k: int,
    *,
    better: str = "higher",
    level: float = LEVEL,
    n_boot: int = BOOTSTRAP,
) -> Difference:
    """D̂ of a statistic of (prediction, label) pairs, e.g. QWK: ``pairs`` holds per seed (ε predictions, ∞
    predictions, labels) on the same images; ``statistic`` maps confusion counts (…, k²) to values (…)."""
    if not pairs:
        return Difference(None, None, None, 0, 0, better=better, note="no paired runs")
    n = len(pairs[0][2])
    w = _weights(n, n_boot, np.random.default_rng(SEED))
    per_seed, boot = [], np.zeros(n_boot)
    for pred_a, pred_b, label in pairs:
        onehot_a = np.eye(k * k)[np.asarray(label) * k + np.asarray(pred_a)]
        onehot_b = np.eye(k * k)[np.asarray(label) * k + np.asarray(pred_b)]
        per_seed.append(float(statistic(onehot_a.sum(0)) - statistic(onehot_b.sum(0))))
        boot += statistic(w @ onehot_a) - statistic(w @ onehot_b)
    per = np.array(per_seed)
    point = float(per.mean())
    lo, hi, note = _interval(point, per, boot / len(pairs), level)
    return Difference(point, lo, hi, len(pairs), n, per_seed, better, note)
