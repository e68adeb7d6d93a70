import json
import math

import dp_accounting as dpa
import pytest

from dpcam.errors import UserError
from dpcam.privacy import accounting as A

# ----------------------------------------------------------------------------- Gaussian


def test_opacus_rdp_golden_value():
    # Opacus's own test value: σ=1.5, q=0.04, 2250 steps, δ=1e-5
    assert A.gaussian_epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp") == pytest.approx(7.32911, abs=1e-4)


def test_dp_accounting_rdp_cross_check_close_to_opacus_rdp():
    opacus_rdp = A.gaussian_epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp")
    independent = A.gaussian_epsilon_rdp_dp_accounting(1.5, 0.04, 2250, 1e-5)
    assert independent == pytest.approx(opacus_rdp, rel=1e-3)


def test_prv_is_tighter_than_rdp():
    prv = A.gaussian_epsilon(1.5, 0.04, 2250, 1e-5, accountant="prv")
    rdp = A.gaussian_epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp")
    assert 0.8 * rdp < prv <= rdp


def test_gaussian_edge_cases():
    assert A.gaussian_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert A.gaussian_epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert A.gaussian_epsilon_rdp_dp_accounting(0.0, 0.1, 10, 1e-5) == math.inf
    # ε grows with steps
    assert A.gaussian_epsilon(1.0, 0.1, 20, 1e-5, "rdp") > A.gaussian_epsilon(1.0, 0.1, 10, 1e-5, "rdp")


def test_gdp_surfaces_opacus_warning():
    with pytest.warns(UserWarning, match="gdp.*underestimate"):
        A.gaussian_epsilon(1.0, 0.1, 100, 1e-5, accountant="gdp")


@pytest.mark.parametrize("target, q, steps, accountant", [(1.0, 0.05, 200, "rdp"), (4.0, 0.1, 100, "prv")])
def test_calibrate_gaussian_reaches_target_from_below(target, q, steps, accountant):
    sigma = A.calibrate_gaussian(target, 1e-5, q, steps, accountant=accountant)
    eps = A.gaussian_epsilon(sigma, q, steps, 1e-5, accountant=accountant)
    assert target * 0.97 <= eps <= target


def test_calibrate_gaussian_unreachable_target_is_user_error():
    with pytest.raises(UserError, match="cannot be reached.*raise ε"):
        A.calibrate_gaussian(1e-4, 1e-5, 1.0, 10_000, accountant="rdp")


# ----------------------------------------------------------------------------- Laplace


def test_laplace_single_step_matches_closed_form():
    # one Laplace step of scale b (sensitivity 1) without sampling: δ(ε) = 1 − exp((ε − 1/b)/2),
    # so ε(δ) = 1/b + 2·ln(1 − δ); b = 2, δ = 1e-3 → 0.497999
    expected = 0.5 + 2 * math.log1p(-1e-3)
    got = A.laplace_epsilon(2.0, 1.0, 1, 1e-3)
    assert expected <= got <= expected + 1e-3  # pessimistic discretisation: never below the truth


def test_laplace_step_epsilons():
    assert A.laplace_step_epsilon(4.0) == 0.25
    assert A.laplace_amplified_step_epsilon(4.0, 1.0) == pytest.approx(0.25)
    assert A.laplace_amplified_step_epsilon(4.0, 0.1) == pytest.approx(math.log(1 + 0.1 * (math.exp(0.25) - 1)))
    assert A.laplace_step_epsilon(0.0) == math.inf


def test_laplace_pld_below_independent_composition_bound():
    for lam, q, steps in [(1.0, 0.01, 1000), (0.5, 0.1, 50), (5.0, 0.02, 300)]:
        pld = A.laplace_epsilon(lam, q, steps, 1e-5)
        bound = A.laplace_composition_bound([(lam, q, steps)], 1e-5)
        assert 0 < pld <= bound


def test_laplace_auto_grid_is_accurate():
    # the automatic grid stays within 0.2 % of a 10x finer grid (pessimistic: never below it)
    lam, q, steps = 1.0, 0.01, 1000
    auto = A.laplace_epsilon(lam, q, steps, 1e-4)
    fine = A.laplace_epsilon(lam, q, steps, 1e-4, value_discretization_interval=1e-5)
    assert fine <= auto <= fine * 1.002


def test_laplace_history_composes_segments():
    one = A.laplace_epsilon(2.0, 0.05, 40, 1e-5)
    split = A.laplace_epsilon_history([(2.0, 0.05, 25), (2.0, 0.05, 15)], 1e-5)
    assert split == pytest.approx(one, rel=1e-3)
    assert A.laplace_epsilon_history([], 1e-5) == 0.0
    assert A.laplace_epsilon(2.0, 0.05, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.01, 1000), (0.5, 0.04, 250), (5.0, 0.02, 500)])
def test_calibrate_laplace_reaches_target_from_below(target, q, steps):
    lam = A.calibrate_laplace(target, 1e-5, q, steps)
    eps = A.laplace_epsilon(lam, q, steps, 1e-5)
    assert target * 0.97 <= eps <= target


def test_laplace_noise_grows_as_epsilon_shrinks():
    lams = [A.calibrate_laplace(eps, 1e-5, 0.05, 100) for eps in (4.0, 1.0, 0.25)]
    assert lams[0] < lams[1] < lams[2]


def test_calibrate_laplace_unreachable_target_is_user_error():
    with pytest.raises(UserError, match="cannot be reached.*λ"):
        A.calibrate_laplace(1e-7, 1e-5, 1.0, 1000)


def test_auto_grid_accountant_is_a_dp_accounting_accountant():
    acc = A.AutoGridLaplacePLDAccountant()
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.LaplaceDpEvent(2.0)), 30)
    assert acc.supports(event)
    assert not acc.supports(dpa.GaussianDpEvent(1.0))
    assert acc.compose(event).get_epsilon(1e-5) == A.laplace_epsilon(2.0, 0.05, 30, 1e-5)
    with pytest.raises(dpa.UnsupportedEventError):
        acc.compose(dpa.GaussianDpEvent(1.0))


# ----------------------------------------------------------------------------- errors and report


@pytest.mark.parametrize(
    "call",
    [
        lambda: A.calibrate_gaussian(0.0, 1e-5, 0.1, 10),
        lambda: A.calibrate_gaussian(-1.0, 1e-5, 0.1, 10),
        lambda: A.calibrate_laplace(0.0, 1e-5, 0.1, 10),
        lambda: A.calibrate_laplace(float("inf"), 1e-5, 0.1, 10),
        lambda: A.calibrate_laplace(1.0, 1.0, 0.1, 10),
        lambda: A.calibrate_laplace(1.0, 0.0, 0.1, 10),
        lambda: A.gaussian_epsilon(1.0, 0.1, 10, 1.5),
        lambda: A.laplace_epsilon(1.0, 0.1, 10, -1e-5),
        lambda: A.gaussian_epsilon(1.0, 0.1, 10, 1e-5, accountant="moments"),
        lambda: A.calibrate_gaussian(1.0, 1e-5, 0.1, 10, accountant="nope"),
        lambda: A.laplace_epsilon(1.0, 1.5, 10, 1e-5),
        lambda: A.calibrate_laplace(1.0, 1e-5, 0.1, 0),
    ],
)
def test_bad_inputs_are_user_errors(call):
    with pytest.raises(UserError):
        call()


def test_privacy_report_is_json_safe():
    rep = A.PrivacyReport(
        scheme="none",
        target_epsilon=None,
        epsilon=math.inf,
        delta=None,
        noise_multiplier=None,
        max_grad_norm=None,
        sample_rate=None,
        steps=0,
        accountant=None,
        extra={"poisson_rate": 0.1},
    )
    d = rep.as_dict()
    assert d["epsilon"] is None and d["poisson_rate"] == 0.1
    for key in (
        "scheme",
        "target_epsilon",
        "epsilon",
        "delta",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "accountant",
        "epsilon_rdp_check",
        "step_epsilon",
    ):
        assert key in d
    json.dumps(d, allow_nan=False)


def test_l2_laplace_bound_is_the_laplace_mechanism_at_l1_sensitivity_sqrt_d_c():
    """laplace-paper's only ε: one step without subsampling of Laplace(σC) noise on a sum whose L1 sensitivity is
    √d·C is (√d/σ)-DP: pure ε √d/σ (here √16/2 = 2), which the PLD reaches at a tiny δ."""
    assert A.l2_laplace_epsilon_bound(2.0, 1.0, 1, 1e-12, 16) == pytest.approx(2.0, rel=0.01)
    assert A.l2_laplace_epsilon_bound(0.97, 1 / 17, 136, 1e-5, 15637) > 1000  # the quick study's replica at ε = 5
    with pytest.raises(UserError, match="dimension"):
        A.l2_laplace_epsilon_bound(1.0, 0.1, 3, 1e-5, 0)


def test_strong_noise_is_accounted_without_a_warning_and_rdp_tries_orders_above_63():
    """PRV's domain warning (the default study's ε = 0.5 recipe: σ 7.11, q 1/17, 272 steps) is not the user's to act
    on and is not shown. Under noise strong for its steps (σ 20, 10 steps) the best RDP order is above Opacus's 63:
    Opacus's range warns and gives 3× the ε; the rdp accountant's wider range gives dp_accounting's RDP (1.1 … 1024)."""
    import warnings

    from opacus.accountants import RDPAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.gaussian_epsilon(7.109375, 1 / 17, 272, 1e-5, accountant="prv")
        wide = A.gaussian_epsilon(20.0, 1 / 17, 10, 1e-5, accountant="rdp")
    opacus = RDPAccountant()
    opacus.history = [(20.0, 1 / 17, 10)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        narrow = opacus.get_epsilon(1e-5)
    assert any("largest alpha" in str(w.message) for w in caught)  # Opacus's own range stops short here
    assert wide < narrow / 3 and wide == pytest.approx(A.gaussian_epsilon_rdp_dp_accounting(20.0, 1 / 17, 10, 1e-5))
