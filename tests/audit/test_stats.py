"""The audit's statistics on hand-made numbers: intervals, ROC counts, metrics, the ε bound, the check."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from dpcam.audit import stats as A
from dpcam.privacy.profile import privacy_profile, profile_epsilon

# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (3, 200), (199, 200), (1, 1)])
def test_clopper_pearson_matches_scipys_exact_interval(k, n):
    lo, hi = A.clopper_pearson(k, n, 0.95)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert float(lo) == pytest.approx(ci.low, abs=1e-12) and float(hi) == pytest.approx(ci.high, abs=1e-12)


def test_clopper_pearson_closed_forms_and_vectorised():
    n = np.array([10, 100, 1000])
    lo, hi = A.clopper_pearson(np.zeros(3, int), n, 0.95)
    assert np.allclose(hi, 1 - 0.025 ** (1 / n)) and np.all(lo == 0)  # k = 0: upper end 1 − (α/2)^(1/n)
    lo, hi = A.clopper_pearson(n, n, 0.9)
    assert np.allclose(lo, 0.05 ** (1 / n)) and np.all(hi == 1)
    assert A.clopper_pearson(5, 10)[0] == pytest.approx(0.187086, abs=1e-6)  # the textbook 5/10 interval


def test_roc_counts_and_metrics_on_hand_made_scores():
    member, non = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.65, 0.4, 0.3, 0.2])
    t, tp, fp = A.roc_counts(member, non)
    assert t[0] == np.inf and tp[0] == fp[0] == 0
    assert (
        list(t[1:5]) == [0.9, 0.8, 0.7, 0.65]
        and list(tp[:6]) == [0, 1, 2, 3, 3, 4]
        and list(fp[:6]) == [0, 0, 0, 0, 1, 1]
    )
    assert tp[-1] == 4 and fp[-1] == 4
    r = A.attack_metrics("x", member, non, member, non, delta=0.0, confidence=0.95)
    assert r.metrics["auc"] == pytest.approx(15 / 16)  # 0.6 < 0.65 is the one pair out of 16 ranked wrong
    # best balanced accuracy on the selection half: t = 0.7 (TPR 3/4, FPR 0) ties t = 0.6; the first is kept
    assert r.metrics["balanced_accuracy"] == pytest.approx((0.75 + 1) / 2) == r.metrics["balanced_accuracy_oracle"]
    assert r.metrics["tpr_at_fpr_0.01"] == 0.75 and r.metrics["tpr_at_fpr_0.001"] == 0.75
    # separated vs identical score sets
    assert A.attack_metrics("x", member + 1, non, member + 1, non, 0.0, 0.95).metrics["auc"] == 1.0
    same = A.attack_metrics("x", non, non, non, non, 0.0, 0.95).metrics
    assert same["auc"] == 0.5 and same["epsilon_lb"] == 0.0 and same["balanced_accuracy"] == 0.5


def test_threshold_is_chosen_on_the_selection_half_only():
    rng = np.random.default_rng(0)
    sel_m, sel_n = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    ev = rng.normal(0, 1, 200), rng.normal(0, 1, 200)  # no signal on the evaluation half
    r = A.attack_metrics("x", sel_m, sel_n, *ev, delta=1e-5, confidence=0.95).metrics
    assert r["epsilon_lb"] == 0.0 and abs(r["auc"] - 0.5) < 0.1  # selection-half leakage is not reported
    assert r["tp"] == int((ev[0] >= r["threshold"]).sum()) and r["fp"] == int((ev[1] >= r["threshold"]).sum())


def test_epsilon_lower_bound_by_hand():
    n, d = 100, 1e-5
    lo = 0.025 ** (1 / n)  # CP lower end of 100/100, upper end of 0/100 is 1 − lo
    assert float(A.epsilon_lower_bound(n, 0, n, n, d)) == pytest.approx(math.log((lo - d) / (1 - lo)))

    def cp(k):
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        return ci.low, ci.high

    # TPR 1, FPR 0.5: the second form wins: log((1 − FPR_hi − δ) / (1 − TPR_lo))
    tpr_lo, fpr_hi = cp(n)[0], cp(50)[1]
    want = max(math.log((tpr_lo - d) / fpr_hi), math.log((1 - fpr_hi - d) / (1 - tpr_lo)))
    assert want == pytest.approx(math.log((1 - fpr_hi - d) / (1 - tpr_lo)))
    assert float(A.epsilon_lower_bound(n, 50, n, n, d)) == pytest.approx(want)
    # TPR 0.5, FPR 0: the first form wins
    tpr_lo, fpr_hi = cp(50)[0], cp(0)[1]
    assert float(A.epsilon_lower_bound(50, 0, n, n, d)) == pytest.approx(math.log((tpr_lo - d) / fpr_hi))
    # no better than chance: no positive bound
    assert float(A.epsilon_lower_bound(50, 50, n, n, d)) < 0
    # vectorised over thresholds
    assert A.epsilon_lower_bound(np.array([n, 50]), np.array([0, 50]), n, n, d).shape == (2,)


def test_allowed_tpr_line_by_hand():
    out = A.allowed_tpr([0.0, 0.01, 0.5, 1.0], [1.0], [1e-5])
    assert out[0] == pytest.approx(1e-5) and out[1] == pytest.approx(math.e * 0.01 + 1e-5)
    assert out[2] == pytest.approx(1 - math.exp(-1) * (0.5 - 1e-5))  # the symmetric constraint binds
    assert out[3] == 1.0


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 4)])
def test_pld_curve_is_the_exact_gaussian_trade_off(sigma, steps):
    """Without subsampling, T Gaussian steps are μ-GDP with μ = √T/σ: TPR = Φ(Φ⁻¹(FPR) + μ) exactly."""
    fpr = np.array([1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9])
    exact = norm.cdf(norm.ppf(fpr) + math.sqrt(steps) / sigma)
    curve = A.allowed_tpr(fpr, *privacy_profile("gaussian", sigma, 1.0, steps, 1e-5))
    assert np.all(curve >= exact - 1e-9) and np.all(curve <= exact + 1e-4)  # a valid, tight upper bound


def test_pld_curve_is_the_exact_laplace_trade_off():
    """Laplace with ε = 1/λ (Dong, Roth & Su 2022): TPR = e^ε·α, 1 − e^−ε/(4α), 1 − e^−ε(1 − α) by region."""
    lam = 2.0
    eps = 1 / lam
    fpr = np.array([1e-3, 0.1, 0.3, 0.5, 0.9])
    exact = np.where(
        fpr < math.exp(-eps) / 2,
        math.exp(eps) * fpr,
        np.where(fpr <= 0.5, 1 - math.exp(-eps) / (4 * fpr), 1 - math.exp(-eps) * (1 - fpr)),
    )
    curve = A.allowed_tpr(fpr, *privacy_profile("laplace", lam, 1.0, 1, 1e-5))
    assert np.all(curve >= exact - 1e-9) and np.all(curve <= exact + 1e-3)


def test_subsampled_profile_agrees_with_the_accountant():
    from dpcam.privacy.accounting import gaussian_epsilon

    eps, deltas = privacy_profile("gaussian", 1.0, 0.1, 100, 1e-5)
    assert profile_epsilon((eps, deltas), 1e-5) == pytest.approx(gaussian_epsilon(1.0, 0.1, 100, 1e-5), rel=0.01)
    # the curve is far tighter than the ε line at this ε (≈ 7): TPR at FPR 1% ≤ 0.15, the line allows 1
    assert A.allowed_tpr([0.01], eps, deltas)[0] < 0.15 < A.allowed_tpr([0.01], [7.0], [1e-5])[0]


def test_check_points_flags_a_hand_made_violation():
    per = A.check_points({"ok": (0.5, 0.6), "bad": (0.01, 0.5)}, epsilon=1.0, delta=1e-5)
    assert per["ok"]["violation"] is False and per["ok"]["within_pld"] is None
    assert per["bad"]["violation"] is True and per["bad"]["allowed_tpr_line"] == pytest.approx(math.e * 0.01 + 1e-5)
    # inside the (ε, δ) line but outside a (tighter) profile curve: still a violation
    profile = (np.array([0.1]), np.array([1e-5]))
    per = A.check_points({"p": (0.2, 0.4)}, epsilon=1.0, delta=1e-5, curve=profile)["p"]
    assert per["within_line"] and not per["within_pld"] and per["violation"]
