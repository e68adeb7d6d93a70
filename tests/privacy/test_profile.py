"""Privacy profiles and trade-off curves for both neighbouring relations, against independent computations."""

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from dpcam.privacy import profile as P

FPR = np.array([1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 0.5, 0.9])

# the worked example of docs/privacy.md: PRV-calibrated σ for ε = 1 at q = 1/92 over 3 epochs
EXAMPLE = dict(noise_multiplier=1.057, sample_rate=1 / 92, steps=276, delta=1e-5)


def laplace_trade_off(eps: float, fpr: np.ndarray) -> np.ndarray:
    """Largest TPR of one Laplace mechanism with privacy loss ε = Δ/b (Dong, Roth & Su 2022), exact."""
    return np.where(
        fpr < math.exp(-eps) / 2,
        math.exp(eps) * fpr,
        np.where(fpr <= 0.5, 1 - math.exp(-eps) / (4 * fpr), 1 - math.exp(-eps) * (1 - fpr)),
    )


def test_worked_example_add_remove_against_replace_one():
    """σ = 1.057, q = 1/92, T = 276, δ = 1e-5: ε 0.997 (Opacus PRV, add/remove) is 1.439 for replace-one; at FPR
    1 % the add/remove curve allows TPR 0.0184 and the replace-one curve 0.0248 (docs/privacy.md)."""
    from dpcam.privacy.accounting import gaussian_epsilon

    eps = gaussian_epsilon(**EXAMPLE)
    assert eps == pytest.approx(0.997, abs=5e-4)
    add_remove = P.trade_off("gaussian", **EXAMPLE, epsilon=eps, relation=P.ADD_REMOVE)
    replace_one = P.trade_off("gaussian", **EXAMPLE, epsilon=eps, relation=P.REPLACE_ONE)
    assert add_remove.relation == "add-or-remove-one" and replace_one.relation == "replace-one"
    assert "REPLACE_ONE" in replace_one.method
    assert add_remove.epsilon(1e-5) == pytest.approx(0.988, abs=2e-3)  # the PLD's own add/remove ε
    assert replace_one.epsilon(1e-5) == pytest.approx(1.439, abs=3e-3)
    assert float(add_remove.allowed_tpr([0.01])[0]) == pytest.approx(0.0184, abs=1e-4)
    assert float(replace_one.allowed_tpr([0.01])[0]) == pytest.approx(0.0248, abs=1e-4)


@pytest.mark.parametrize(
    "scheme, noise, q, steps",
    [("gaussian", 1.057, 1 / 92, 276), ("laplace", 1.735, 1 / 17, 68), ("laplace", 1.0, 1, 1)],
)
def test_the_replace_one_profile_dominates_the_add_remove_one(scheme, noise, q, steps):
    """A replace-one neighbour is further apart than an added or removed one: more is allowed, at every FPR and ε."""
    ar = P.trade_off(scheme, noise, q, steps, 1e-5, relation=P.ADD_REMOVE)
    ro = P.trade_off(scheme, noise, q, steps, 1e-5, relation=P.REPLACE_ONE)
    assert np.all(ro.allowed_tpr(FPR) >= ar.allowed_tpr(FPR) - 1e-9)
    assert np.all(ro.allowed_tpr(FPR[:4]) > 1.2 * ar.allowed_tpr(FPR[:4]))  # and strictly, by a margin
    for delta in (1e-3, 1e-5, 1e-8):
        assert ro.epsilon(delta) > 1.2 * ar.epsilon(delta)
    eps = np.linspace(0, ar.epsilons[-1], 50)
    assert np.all(np.interp(eps, ro.epsilons, ro.deltas) >= np.interp(eps, ar.epsilons, ar.deltas) - 1e-9)


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 4)])
def test_gaussian_replace_one_without_subsampling_is_the_exact_shift_by_two(sigma, steps):
    """q = 1: replacing one example moves the sum by 2C, so T steps are μ-GDP with μ = 2√T/σ, exactly."""
    exact = norm.cdf(norm.ppf(FPR) + 2 * math.sqrt(steps) / sigma)
    curve = P.trade_off("gaussian", sigma, 1.0, steps, 1e-5).allowed_tpr(FPR)
    assert np.all(curve >= exact - 1e-9) and np.all(curve <= exact + 1e-3)


def test_one_laplace_step_without_subsampling_is_exactly_two_over_lambda():
    """One Laplace step with noise λ, q = 1: replace-one is the Laplace mechanism with sensitivity 2, pure ε = 2/λ,
    and δ(ε) = 1 − e^{(ε − 2/λ)/2} below it; the add/remove ε is 1/λ."""
    lam = 2.0
    ro = P.trade_off("laplace", lam, 1.0, 1, 1e-5)
    assert P.trade_off("laplace", lam, 1.0, 1, 1e-5, relation=P.ADD_REMOVE).epsilon(1e-11) == pytest.approx(1 / lam)
    # ε = 2/λ up to the grid (δ at 2/λ is not 0 but ~5e-10: the legs are bounded by tangent lines on a grid)
    assert ro.epsilon(1e-9) == pytest.approx(2 / lam, abs=1e-3) and ro.epsilon(1e-3) > 0.99 * 2 / lam
    at = np.searchsorted(ro.epsilons, [0.0, 0.2, 0.5, 0.9, 0.99])  # grid points of the profile
    exact = 1 - np.exp((ro.epsilons[at] - 2 / lam) / 2)
    assert np.all(ro.deltas[at] >= exact - 1e-12) and np.all(ro.deltas[at] <= exact + 5e-4)
    curve = ro.allowed_tpr(FPR)
    exact_curve = laplace_trade_off(2 / lam, FPR)
    assert np.all(curve >= exact_curve - 1e-9) and np.all(curve <= exact_curve + 1e-3)


@pytest.mark.parametrize("lam, steps", [(2.0, 3), (0.7, 2)])
@pytest.mark.slow
def test_laplace_replace_one_without_subsampling_matches_sensitivity_two(lam, steps):
    """q = 1, T steps: replace-one is T Laplace steps of sensitivity 2, which dp_accounting computes directly."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    ref = pld_lib.from_laplace_mechanism(lam, sensitivity=2, value_discretization_interval=1e-4).self_compose(steps)
    ro = P.trade_off("laplace", lam, 1.0, steps, 1e-5)
    for delta in (1e-2, 1e-5, 1e-8):
        want = ref.get_epsilon_for_delta(delta)
        assert want - 2e-3 <= ro.epsilon(delta) <= want * 1.01 + 2e-3


def test_one_subsampled_laplace_step_bounds_a_real_replace_pair_tightly():
    """q = 0.3, λ = 1, one step: the 1-D pair q·Lap(−1) + (1−q)·Lap(0) against q·Lap(1) + (1−q)·Lap(0) is a real
    replace-one pair (z's clipped gradient −1, z′'s +1), so the bound must lie above its hockey-stick divergence
    (numerical integration, independent of dp_accounting); it lies within 0.5 % of it."""
    lam, q = 1.0, 0.3

    def density(x, shift):
        return q * 0.5 / lam * math.exp(-abs(x - shift) / lam) + (1 - q) * 0.5 / lam * math.exp(-abs(x) / lam)

    def hockey_stick(g):
        return integrate.quad(
            lambda x: max(density(x, -1.0) - g * density(x, 1.0), 0.0), -60, 60, points=[-1, 0, 1], limit=400
        )[0]

    ro = P.trade_off("laplace", lam, q, 1, 1e-5)
    for i in np.searchsorted(ro.epsilons, [0.0, 0.2, 0.5, 0.6]):
        pair = hockey_stick(math.exp(ro.epsilons[i]))
        assert pair - 1e-9 <= ro.deltas[i] <= pair * 1.005 + 1e-6
    top = math.log((q * math.exp(1 / lam) + 1 - q) / (q * math.exp(-1 / lam) + 1 - q))  # the pair's largest loss
    assert ro.epsilon(1e-9) == pytest.approx(top, abs=2e-3)


@pytest.mark.slow
def test_the_laplace_construction_gives_back_dp_accountings_gaussian_replace_one():
    """Built the Laplace way (each step's remove and add legs composed, then the steps by PLD) from the Gaussian's
    add/remove PLD, the replace-one ε comes out within 1 % above dp_accounting's own REPLACE_ONE PLD."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    sigma, q, steps = 2.0, 0.2, 10
    one = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=P._STEP_VDI)
    built = P._replace_one_by_steps(one, steps, 1e-10, None, "gaussian")
    exact = P.trade_off("gaussian", sigma, q, steps, 1e-5)
    for delta in (1e-3, 1e-5):
        assert exact.epsilon(delta) - 2e-3 <= built.epsilon(delta) <= 1.01 * exact.epsilon(delta) + 2e-3
    assert np.all(built.allowed_tpr(FPR) >= exact.allowed_tpr(FPR) - 2e-3)


def test_envelope_pair_is_a_probability_pair_on_the_grid():
    """The pair built from a δ sequence: masses ≥ 0 summing to 1, losses ±k on the grid, δ at every grid point
    at most the given δ_k (it is the concave envelope of their lines) and at least the curve it bounds."""
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    h, lam = 1e-3, 2.0
    k = np.arange(1001)
    given = np.maximum(1 - np.exp((k * h - 2 / lam) / 2), 0) + 1e-12  # one Laplace step, sensitivity 2
    pmf, infinity = P._envelope_pmf(given, h)
    assert min(pmf.values()) >= 0 and sum(pmf.values()) + infinity == pytest.approx(1, abs=1e-12)
    assert max(pmf) == 1000 and min(pmf) == -1000 and infinity == pytest.approx(1e-12)
    pld = PrivacyLossDistribution.create_from_rounded_probability(pmf, infinity, h)
    got = np.asarray(pld.get_delta_for_epsilon(k * h))
    assert np.all(got <= given + 1e-12) and np.all(got >= given - 1e-6)


def test_relation_and_scheme_are_checked():
    with pytest.raises(ValueError, match="unknown neighbouring relation"):
        P.trade_off("gaussian", 1.0, 0.1, 10, 1e-5, relation="swap")
    with pytest.raises(ValueError, match="no privacy profile"):
        P.trade_off("none", 1.0, 0.1, 10, 1e-5)
