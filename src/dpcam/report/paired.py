"""Paired differences to a reference: the same seeds, the same test images, an interval that covers.

For a metric m, a configuration (e.g. Gaussian ε = 1) and its reference (ε = ∞):

    d_s(i) = m(ε, seed s, image i) − m(∞, seed s, image i)         (images both runs scored validly)
    D̂_s    = mean over images i of d_s(i)
    D̂      = mean over seeds s of D̂_s

D̂ estimates the difference a team would see with a new training seed on new test images, so the
interval covers both sources (docs/verdict.md, "The interval"):

- **A, the seed part** = sd(D̂_s)² / S, with k = S − 1 degrees of freedom. Each D̂_s also carries
  its own image noise (the seed × image interaction), so A holds that too.
- **B, the image part the seeds share** = the mean covariance, between two different seeds'
  D̂_s, that sharing the same test images induces (the image effects common to every seed, which
  averaging over seeds cannot remove); from each seed's influence values (a mean: exact
  linearisation, no resampling) or from a paired bootstrap over images (a statistic such as QWK).
  Truncated at 0.

SE² = A + B, and the level-(1 − α) interval is D̂ ± t_{1−α/2, ν}·SE with Satterthwaite's ν computed
with the seed part counted c(k, α) times (:mod:`.coverage`: c is calibrated so that the interval
covers at least 1 − α at every ratio of seed to image variance). The two-sided p-value of D = 0 is
the smallest α whose interval excludes 0. With one seed there is no A: the interval covers test
images only, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from dpcam.report import coverage

LEVEL = 0.95
BOOTSTRAP = 2000
SEED = 20261130  # the bootstrap's own seed: the report is deterministic
ONE_SEED = "one seed: the interval covers test-image sampling only"
WORSE, BETTER = "▼", "▲"


@dataclass
class Difference:
    """One paired difference (configuration − reference) with its interval.

    ``better`` says which sign is an improvement. ``a`` / ``b`` are the seed and image parts of the
    variance (:mod:`dpcam.report.paired`), ``images`` the images valid in at least one seed and
    ``per_seed_images`` per seed; ``mark`` is set by a multiplicity correction (:func:`correct`); ``problem``
    says why there is no difference when a run had no partner or a file could not be read.
    """

    mean: float | None
    lo: float | None
    hi: float | None
    seeds: int
    images: int
    per_seed: list[float] = field(default_factory=list)
    better: str = "higher"  # "higher" or "lower": the direction in which the metric improves
    note: str = ""
    a: float | None = None
    b: float | None = None
    per_seed_images: list[int] = field(default_factory=list)
    mark: str = ""
    problem: str = ""  # why the comparison could not be made (an unpaired run, an unreadable file)

    # -------------------------------------------------------------------- the interval at any level

    @property
    def se(self) -> float | None:
        if self.mean is None or self.b is None:
            return None
        return math.sqrt((self.a or 0.0) + self.b)

    def df(self, alpha: float = 1 - LEVEL) -> float:
        """Degrees of freedom of the level-(1 − α) interval (∞ with one seed: the image part is known)."""
        if self.seeds < 2 or self.a is None:
            return math.inf if self.images < 2 else float(max(self.images - 1, 1))
        return coverage.degrees_of_freedom(self.a, self.b or 0.0, self.seeds - 1, max(self.images, 2), alpha)

    def half_width(self, alpha: float = 1 - LEVEL) -> float | None:
        from scipy import stats

        se = self.se
        if se is None:
            return None
        return float(stats.t.ppf(1 - alpha / 2, min(self.df(alpha), 1e7)) * se)

    def interval(self, alpha: float = 1 - LEVEL) -> tuple[float, float] | None:
        h = self.half_width(alpha)
        return None if h is None else (self.mean - h, self.mean + h)

    @cached_property
    def p(self) -> float | None:
        """Two-sided p-value of "no difference": the smallest α whose interval excludes 0."""
        return self.p_shifted(0.0)

    def p_shifted(self, shift: float) -> float | None:
        """Two-sided p-value of "the difference is ``shift``" (the smallest α whose interval excludes it)."""
        from scipy import optimize

        se = self.se
        if se is None:
            return None
        gap = abs(self.mean - shift)
        if se == 0:
            return 0.0 if gap > 0 else 1.0
        excess = lambda log_a: self.half_width(math.exp(log_a)) - gap  # falls as α grows
        lo_a, hi_a = math.log(1e-12), math.log(1.0 - 1e-9)
        if excess(hi_a) >= 0:
            return 1.0
        if excess(lo_a) <= 0:
            return 1e-12
        return float(math.exp(optimize.brentq(excess, lo_a, hi_a, xtol=1e-6)))

    # -------------------------------------------------------------------- words

    def _towards_better(self, x: float) -> float:
        return x if self.better == "higher" else -x

    @property
    def distinguishable(self) -> bool:
        """The 95 % interval excludes 0 (unadjusted for multiplicity)."""
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    @property
    def worse(self) -> bool:
        """Distinguishably worse than the reference (unadjusted)."""
        return self.distinguishable and self._towards_better(self.mean) < 0

    @property
    def improved(self) -> bool:
        """Distinguishably better than the reference (unadjusted)."""
        return self.distinguishable and self._towards_better(self.mean) > 0

    def _ends(self, alpha: float) -> tuple[float, float] | None:
        if alpha == 1 - LEVEL:
            return None if self.lo is None else (self.lo, self.hi)
        return self.interval(alpha)

    def worst_end(self, alpha: float = 1 - LEVEL) -> float | None:
        """The end of the level-(1 − α) interval (95 %) furthest in the worse direction, as a signed loss (> 0 = a
        loss)."""
        ends = self._ends(alpha)
        return None if ends is None else max(-self._towards_better(e) for e in ends)

    def best_end(self, alpha: float = 1 - LEVEL) -> float | None:
        """The end of the level-(1 − α) interval (95 %) furthest in the better direction, as a signed gain (> 0 = a
        gain)."""
        ends = self._ends(alpha)
        return None if ends is None else max(self._towards_better(e) for e in ends)

    def noninferior(self, margin: float, alpha: float = 1 - LEVEL) -> bool:
        """Non-inferiority shown: the whole level-(1 − α) interval (95 %) lies on the better side of −margin (a
        one-sided α/2 test that the loss is smaller than ``margin``)."""
        end = self.worst_end(alpha)
        return end is not None and end < margin

    def detectable(self, power: float = 0.8, alpha: float = 1 - LEVEL) -> float | None:
        """The smallest true difference this comparison would call distinguishable with probability ``power``:
        (t_{1−α/2, ν} + t_{power, ν})·SE."""
        from scipy import stats

        se = self.se
        if se is None:
            return None
        nu = min(self.df(alpha), 1e7)
        return float((stats.t.ppf(1 - alpha / 2, nu) + stats.t.ppf(power, nu)) * se)

    def images_words(self) -> str:
        """``200 images`` or ``12–91 images per seed``."""
        counts = self.per_seed_images or [self.images]
        lo, hi = min(counts), max(counts)
        return f"{lo} images" + (" per seed" if len(counts) > 1 else "") if lo == hi else f"{lo}–{hi} images per seed"

    def words(self, decimals: int = 3) -> str:
        """``-0.052 [-0.081, -0.023]`` or ``—``."""
        if self.mean is None:
            return "—"
        f = f"{{:+.{decimals}f}}"
        if self.lo is None:
            return f.format(self.mean) + " (no interval)"
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def _finish(point: float, per_seed: np.ndarray, cov: np.ndarray, n: int, counts: list[int], better: str) -> Difference:
    """The Difference from the per-seed differences and the image-sampling covariance ``cov`` (S × S) of them."""
    s = per_seed.size
    if s == 1:
        a, b, note = None, float(max(cov[0, 0], 0.0)), ONE_SEED
    else:
        a = float(np.var(per_seed, ddof=1) / s)
        off = cov[~np.eye(s, dtype=bool)]
        b, note = float(max(off.mean(), 0.0)), ""
    d = Difference(point, None, None, s, n, per_seed.tolist(), better, note, a, b, counts)
    iv = d.interval()
    d.lo, d.hi = iv if iv else (None, None)
    return d


def paired_mean(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, better: str = "higher") -> Difference:
    """D̂ of a per-image metric: ``pairs`` holds per seed (configuration values, reference values), aligned by
    image, NaN = not valid there (left out of that seed's mean).

    Every seed's arrays must cover the same images in the same order (ValueError otherwise: never cut).
    """
    pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in pairs]
    if not pairs:
        return Difference(None, None, None, 0, 0, better=better, note="no paired runs")
    n = pairs[0][0].size
    if any(x.size != n or y.size != n for x, y in pairs):
        raise ValueError("every seed's runs must score the same images")
    d = np.stack([x - y for x, y in pairs])  # (S, N)
    valid = np.isfinite(d)
    counts = valid.sum(axis=1)
    if not (counts > 0).all():
        return Difference(None, None, None, len(pairs), 0, better=better, note="no image with a valid value")
    per_seed = np.array([row[ok].mean() for row, ok in zip(d, valid)])
    used = int(valid.any(axis=0).sum())
    # influence of image i on D̂_s: D̂_s ≈ D̂_s + (1/N) Σ_i u_s(i); its image-sampling covariance across seeds
    u = np.where(valid, d - per_seed[:, None], 0.0) * (used / counts)[:, None]
    u = u[:, valid.any(axis=0)]
    cov = (u @ u.T) / (used * max(used - 1, 1))
    return _finish(float(per_seed.mean()), per_seed, cov, used, counts.tolist(), better)


def _weights(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resampling counts: (b, n), each row a multinomial draw of n out of n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)


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
    n_boot: int = BOOTSTRAP,
) -> Difference:
    """D̂ of a statistic of (prediction, label) pairs, e.g. QWK: ``pairs`` holds per seed (configuration
    predictions, reference predictions, labels) on the same images; ``statistic`` maps confusion counts (…, k²)
    to values (…). The image part comes from a paired bootstrap over images (the same resamples for every seed)."""
    cells = np.eye(k * k)
    return paired_sums(
        [(cells[np.asarray(y) * k + np.asarray(a)], cells[np.asarray(y) * k + np.asarray(b)]) for a, b, y in pairs],
        statistic,
        better=better,
        n_boot=n_boot,
    )


def paired_sums(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    better: str = "higher",
    n_boot: int = BOOTSTRAP,
) -> Difference:
    """D̂ of a statistic of per-image feature sums: ``pairs`` holds per seed (configuration, reference) feature
    rows (images × d) of the same images; ``statistic`` maps summed features (…, d) to values (…) — confusion
    counts for QWK, per-bin counts, confidences and hits for the calibration error. The image part comes from a
    paired bootstrap over images (the same resamples for every seed)."""
    if not pairs:
        return Difference(None, None, None, 0, 0, better=better, note="no paired runs")
    n = len(pairs[0][0])
    if any(len(a) != n or len(b) != n for a, b in pairs):
        raise ValueError("every seed's runs must score the same images")
    w = _weights(n, n_boot, np.random.default_rng(SEED))
    per_seed, boot = [], []
    for feat_a, feat_b in pairs:
        per_seed.append(float(statistic(feat_a.sum(0)) - statistic(feat_b.sum(0))))
        boot.append(statistic(w @ feat_a) - statistic(w @ feat_b))
    per = np.array(per_seed)
    cov = np.atleast_2d(np.cov(np.stack(boot)))
    return _finish(float(per.mean()), per, cov, n, [n] * len(pairs), better)


# ---------------------------------------------------------------------------------------- multiplicity


def correct(diffs: Sequence[Difference], method: str = "holm", alpha: float = 1 - LEVEL) -> int:
    """Mark (``▲``/``▼`` in ``Difference.mark``) the differences that stay distinguishable from 0 after
    ``method`` over the family ``diffs``: ``holm`` (family-wise error ≤ α) or ``bh`` (Benjamini–Hochberg,
    false-discovery rate ≤ α). Differences without a p-value are not counted. Returns the family size."""
    tested = [(d.p, i) for i, d in enumerate(diffs) if d.p is not None]
    m = len(tested)
    for d in diffs:
        d.mark = ""
    order = sorted(tested)
    keep: list[int] = []
    if method == "holm":
        for j, (p, i) in enumerate(order):
            if p > alpha / (m - j):
                break
            keep.append(i)
    elif method == "bh":
        last = max((j for j, (p, _) in enumerate(order) if p <= (j + 1) * alpha / m), default=-1)
        keep = [i for _, i in order[: last + 1]]
    else:
        raise ValueError(f"unknown correction {method!r}; holm or bh")
    for i in keep:
        d = diffs[i]
        d.mark = BETTER if d._towards_better(d.mean) > 0 else WORSE
    return m


def holm_rejects(ps: Sequence[float | None], alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down over ``ps`` (None = no test): which hypotheses are rejected at family-wise level α."""
    tested = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out = [False] * len(ps)
    for j, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - j):
            break
        out[i] = True
    return out
