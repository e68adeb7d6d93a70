"""The analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8): the exact δ(ε) of a Gaussian
mechanism, and the smallest σ (or ε) that meets a target δ, by bisection in log space.

Plain floats; scipy.special is imported where used.
"""

from __future__ import annotations

import math


def _log1mexp(d: float) -> float:
    """log(1 - e^d) for d < 0, accurate everywhere."""
    return math.log(-math.expm1(d)) if d > -math.log(2.0) else math.log1p(-math.exp(d))


def gaussian_log_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """log δ(ε) of the Gaussian mechanism N(0, σ²) with L2 sensitivity Δ (exact, Balle & Wang 2018).

    δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ), evaluated in log space with ``log_ndtr`` so that
    image-level ε in the thousands does not overflow ``e^ε``. Returns ``-inf`` where δ underflows.
    """
    from scipy.special import log_ndtr

    r = sensitivity / sigma
    la = float(log_ndtr(r / 2 - epsilon / r))
    lb = epsilon + float(log_ndtr(-r / 2 - epsilon / r))
    d = lb - la
    if not d < 0:  # δ is below float resolution
        return -math.inf
    return la + _log1mexp(d)


def _bisect_log(f, lo: float, hi: float, rtol: float = 1e-13) -> float:
    """Root of a decreasing f on (lo, hi) with f(lo) > 0 ≥ f(hi), bisecting in log space."""
    for _ in range(400):
        if hi / lo - 1 <= rtol:
            break
        mid = math.sqrt(lo * hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest σ whose Gaussian mechanism with L2 sensitivity Δ is (ε, δ)-DP (analytic calibration).

    δ(ε, σ) decreases in σ; σ is found by bisection on log σ to relative precision 1e-13 (the
    returned σ errs on the safe, larger side). For ε=1, δ=1e-5, Δ=1: σ ≈ 3.73 (the classic
    √(2 ln(1.25/δ))/ε ≈ 4.84 is looser and only valid for ε < 1).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_target = math.log(delta)

    def f(sigma: float) -> float:
        return gaussian_log_delta(epsilon, sigma, sensitivity) - log_target

    lo = hi = float(sensitivity)
    while f(lo) <= 0:
        lo /= 2
    while f(hi) > 0:
        hi *= 2
    return _bisect_log(f, lo, hi)


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest ε at which N(0, σ²) with L2 sensitivity Δ is (ε, δ)-DP (exact; ``inf`` if unbounded).

    Solves δ(ε) = δ by bisection (δ(ε) decreases in ε); 0 when δ(0) ≤ δ already. Finite for any
    σ > 0 and δ > 0; ``math.inf`` is returned only if the root lies beyond 1e300.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_target = math.log(delta)

    def f(eps: float) -> float:
        return gaussian_log_delta(eps, sigma, sensitivity) - log_target

    if f(0.0) <= 0:
        return 0.0
    lo, hi = 1e-300, 1.0
    while f(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1e300:
            return math.inf
    return _bisect_log(f, lo, hi)
