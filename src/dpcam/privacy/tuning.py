"""What hyper-parameter tuning costs in privacy: every trial of a search trained on the same data.

- :func:`composed_epsilon`: the composition of every trial's mechanism (dp_accounting PLD) — valid
  whatever is released, even every trial's model;
- :func:`random_search_bound`: Papernot & Steinke (2022) for releasing only the best of a random
  number K of random-search trials, from the RDP curve (:func:`rdp_curve`) of the worst-case
  mechanism of the search space (:func:`worst_case_mechanisms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dpcam.privacy.events import run_event, runs_event
from dpcam.privacy.plan import training_plan

# RDP orders for the cost-of-tuning bounds
RDP_ORDERS = (
    1.1,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    96.0,
    128.0,
    256.0,
    512.0,
)

Mechanism = tuple[str, float, float, int]  # (scheme, noise multiplier, sample rate, steps)


def composed_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """ε at ``delta`` of all ``(scheme, noise multiplier, sample rate, steps)`` mechanisms composed (dp_accounting PLD).

    Pessimistic PLD discretisation (an upper bound). Returns 0.0 for none.
    """
    from dp_accounting.pld import PLDAccountant

    if not mechanisms:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(runs_event(mechanisms))
    return float(acc.get_epsilon(delta))


def worst_case_mechanisms(
    schemes: Sequence[str],
    batch_sizes: Sequence[int],
    epochs: tuple[int, int],
    epsilon_high: float,
    delta: float,
    accountant: str,
    train_size: int,
) -> list[Mechanism]:
    """For each (scheme, batch size, epochs) of a search space, the least noise any trial can get.

    The noise is calibrated to ε_high·(1 + 2·rtol) (rtol: the calibration tolerance), whose ε is ≥ ε_high,
    so it is at most the noise of any target ε ≤ ε_high (ε falls as the noise grows): every RDP order
    and every δ(ε) of a trial is bounded by the mechanism returned here. q and steps are the Poisson
    plan training runs (:func:`dpcam.privacy.plan.training_plan`).
    """
    from dpcam.privacy.accounting import CALIBRATION_RTOL, calibrate_gaussian, calibrate_laplace

    target = float(epsilon_high) * (1 + 2 * CALIBRATION_RTOL)
    out = []
    for scheme in schemes:
        for b in batch_sizes:
            for e in range(int(epochs[0]), int(epochs[1]) + 1):
                q, steps = training_plan(train_size, b, e)
                if scheme == "gaussian":
                    noise = calibrate_gaussian(target, delta, q, steps, accountant)
                else:
                    noise = calibrate_laplace(target, delta, q, steps)
                out.append((scheme, noise, q, steps))
    return out


def rdp_curve(scheme: str, noise: float, q: float, steps: int, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP ε(λ) per order of one training run: float64 ``(len(orders),)``.

    Gaussian: Opacus's Poisson-subsampled Gaussian RDP (Mironov et al. 2019). Laplace: each step is
    ε₁-DP with ε₁ = log(1 + q(e^{1/λ} − 1)) (subsampling amplification), and ε₁-DP implies
    (α, min(ε₁, αε₁²/2))-RDP (Bun & Steinke 2016, Prop. 3.3), composed over the steps.
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    from dpcam.privacy.accounting import laplace_amplified_step_epsilon

    orders = np.asarray(orders, dtype=np.float64)
    if scheme == "gaussian":
        return np.asarray(compute_rdp(q=q, noise_multiplier=noise, steps=steps, orders=list(orders)), dtype=np.float64)
    e1 = laplace_amplified_step_epsilon(noise, q)
    return steps * np.minimum(e1, orders * e1 * e1 / 2)


def _rdp_to_dp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Mironov 2017 Prop. 3: (λ, ε)-RDP ⇒ (ε + log(1/δ)/(λ − 1), δ)-DP; the best order."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def random_search_bound(
    distribution: str,
    mean: float,
    mechanisms: Sequence[Mechanism],
    delta: float,
    orders: Sequence[float] = RDP_ORDERS,
) -> float:
    """ε at ``delta`` of releasing the best of K random-search trials, K random (Papernot & Steinke 2022).

    ``mechanisms``: the worst-case runs of the space (:func:`worst_case_mechanisms`); the base
    algorithm Q (draw hyper-parameters, train) is bounded at every order by their maximum.

    - ``poisson`` (their Theorem 6): if Q is (λ, ε)-RDP and (ε̂, δ̂)-DP with e^ε̂ ≤ 1 + 1/(λ − 1),
      K ~ Poisson(μ) gives (λ, ε + μδ̂ + log(μ)/(λ − 1))-RDP; we take ε̂ = log(1 + 1/(λ − 1)) and δ̂ the
      largest δ(ε̂) of the mechanisms (dp_accounting PLD).
    - ``geometric`` (their Theorem 2, truncated negative binomial with η = 1, γ = 1/μ, E[K] = μ):
      (λ, ε(λ) + 2(1 − 1/λ̂)ε(λ̂) + 2 log(μ)/λ̂ + log(μ)/(λ − 1))-RDP for any λ̂ ≥ 1 (best λ̂ taken).

    RDP is converted to (ε, δ)-DP with Mironov's Prop. 3 at the best order.
    """
    from dp_accounting.pld import PLDAccountant

    orders_a = np.asarray(orders, dtype=np.float64)
    rdp = np.max([rdp_curve(*m, orders=orders_a) for m in mechanisms], axis=0)
    if distribution == "poisson":
        eps_hat = np.log1p(1.0 / (orders_a - 1))
        delta_hat = np.zeros_like(orders_a)
        for m in mechanisms:
            acc = PLDAccountant(value_discretization_interval=1e-3)
            acc.compose(run_event(*m))
            delta_hat = np.maximum(delta_hat, [acc.get_delta(float(e)) for e in eps_hat])
        rdp_a = rdp + mean * delta_hat + math.log(mean) / (orders_a - 1)
    elif distribution == "geometric":
        hats = orders_a[:, None]  # λ̂ over rows, λ over columns
        extra = np.min(2 * (1 - 1 / hats) * rdp[:, None] + 2 * math.log(mean) / hats, axis=0)
        rdp_a = rdp + extra + math.log(mean) / (orders_a - 1)
    else:
        raise ValueError(f"no random-search bound for a {distribution!r} number of trials")
    return _rdp_to_dp(rdp_a, orders_a, delta)
