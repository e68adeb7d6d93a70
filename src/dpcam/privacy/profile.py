"""A DP-SGD run's privacy profile δ(ε'): the trade-off curve the membership-inference audit checks against."""

from __future__ import annotations

import math

import numpy as np

PLD_GRID = 2001  # ε' grid points of the privacy-profile curve


def privacy_profile(
    scheme: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float, epsilon: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """δ(ε') of a DP-SGD run on a grid of ε' ≥ 0, from dp_accounting's pessimistic PLD.

    ``scheme`` ``gaussian`` (σ = ``noise_multiplier``, L2 sensitivity 1) or ``laplace`` (λ, L1
    sensitivity 1), Poisson-subsampled at ``sample_rate`` and composed ``steps`` times, add-or-remove
    neighbours (δ is the larger of both directions). Returns float64 ``(epsilons, deltas)`` of
    shape (PLD_GRID + 1,): ε' from 0 to the ε at δ = min(δ, 1e-10), plus the run's own
    (``epsilon``, ``delta``) when given. Discretisation 1e-3 (or ε/200 when smaller).
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    vdi = min(1e-3, epsilon / 200) if epsilon else 1e-3
    if scheme == "gaussian":
        one = pld_lib.from_gaussian_mechanism(
            float(noise_multiplier), sampling_prob=float(sample_rate), value_discretization_interval=vdi
        )
    elif scheme == "laplace":
        one = pld_lib.from_laplace_mechanism(
            float(noise_multiplier), sensitivity=1, sampling_prob=float(sample_rate), value_discretization_interval=vdi
        )
    else:
        raise ValueError(f"no privacy profile for scheme {scheme!r}")
    pld = one.self_compose(int(steps)) if steps > 1 else one
    top = float(pld.get_epsilon_for_delta(min(delta, 1e-10)))
    top = top if math.isfinite(top) and top > 0 else max(1.0, 3 * (epsilon or 1.0))
    eps = np.linspace(0.0, top, PLD_GRID)
    deltas = np.asarray(pld.get_delta_for_epsilon(eps), np.float64)
    if epsilon is not None:
        eps, deltas = np.append(eps, epsilon), np.append(deltas, delta)
    return eps, deltas


def profile_epsilon(profile: tuple[np.ndarray, np.ndarray], delta: float) -> float | None:
    """Smallest grid ε' of the profile with δ(ε') ≤ ``delta`` (None if none)."""
    eps, deltas = profile
    ok = deltas[:PLD_GRID] <= delta
    return float(eps[:PLD_GRID][ok].min()) if ok.any() else None
