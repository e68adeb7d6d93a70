import math

import pytest

from dpcam.data.analytic_gaussian import analytic_gaussian_epsilon, analytic_gaussian_sigma, gaussian_log_delta
from dpcam.data.mechanisms import MECHANISMS


def test_analytic_gaussian_known_value_and_tighter_than_classic():
    sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    assert sigma < math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0  # classic ≈ 4.84
    assert analytic_gaussian_sigma(1.0, 1e-5, 255.0) == pytest.approx(255 * sigma, rel=1e-9)


@pytest.mark.parametrize("eps,delta", [(0.25, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (10.0, 1e-3)])
def test_analytic_gaussian_hits_delta_and_matches_dp_accounting(eps, delta):
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import pld_privacy_accountant

    sigma = analytic_gaussian_sigma(eps, delta, 1.0)
    assert math.exp(gaussian_log_delta(eps, sigma, 1.0)) == pytest.approx(delta, rel=1e-6)
    assert gaussian_log_delta(eps, sigma * 0.99, 1.0) > math.log(delta)  # smallest σ: less noise fails
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(GaussianDpEvent(noise_multiplier=sigma))
    assert acc.get_epsilon(delta) == pytest.approx(eps, rel=2e-3, abs=1e-3)
    assert analytic_gaussian_epsilon(sigma, delta, 1.0) == pytest.approx(eps, rel=1e-9)


def test_image_level_gaussian_epsilon_matches_pld_and_survives_huge_epsilon():
    from dp_accounting.pld import privacy_loss_distribution

    mech = MECHANISMS["pixel-gaussian"](1.0, delta=1e-5)
    g = mech.guarantee((8, 8, 3))
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        mech.sigma, sensitivity=255 * math.sqrt(192), value_discretization_interval=1e-3
    )
    assert g["image_epsilon"] == pytest.approx(pld.get_epsilon_for_delta(1e-5), rel=1e-3)
    assert g["image_epsilon"] > 1.0 and g["image_delta"] == 1e-5
    # 224 px: ε in the thousands, e^ε would overflow without log space
    big = mech.guarantee((224, 224, 3))["image_epsilon"]
    assert big is not None and 5000 < big < 7000
    assert analytic_gaussian_epsilon(255.0 * 1e-4, 1e-5, 255.0) > 1e7  # tiny σ: huge but finite
