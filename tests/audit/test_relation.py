"""The audit's check is for the replace-one relation of its experiment (members vs non-members of one model).

Hand-made attack points against the check of a run's recorded guarantee (``stage._check``): a point that
lies between the add/remove curve the run's ε is stated for and the replace-one curve the experiment
has is allowed; beyond the replace-one curve it is a violation.
"""

import math
from pathlib import Path

import numpy as np
import pytest

from dpcam.audit import stage
from dpcam.audit.stats import AttackResult, epsilon_lower_bound
from dpcam.config import AuditConfig
from dpcam.records import AuditCheck, AuditPrivacy

# docs/privacy.md's worked example: σ = 1.057 (PRV, ε = 1), q = 1/92, T = 276, δ = 1e-5
GAUSSIAN = dict(scheme="gaussian", epsilon=0.9974, delta=1e-5, noise_multiplier=1.057, sample_rate=1 / 92, steps=276)
# the quick profile's Laplace run: λ = 1.735 (PLD, ε = 1), q = 1/17, T = 68, δ = 1e-5
LAPLACE = dict(scheme="laplace", epsilon=0.99997, delta=1e-5, noise_multiplier=1.735, sample_rate=1 / 17, steps=68)


def target() -> stage._Target:
    empty = np.zeros(0, bool)
    return stage._Target("run", None, {}, None, Path("train.json"), None, None, empty, empty)


def attack(fpr_hi: float, tpr_lo: float) -> AttackResult:
    return AttackResult("loss", {"fpr_hi": fpr_hi, "tpr_lo": tpr_lo}, np.zeros(1), np.zeros(1))


def check(privacy: dict, points: dict[str, tuple[float, float]], **cfg) -> AuditCheck:
    results = {name: attack(*p) for name, p in points.items()}
    out, _ = stage._check(target(), AuditConfig(device="cpu", **cfg), results, AuditPrivacy(**privacy))
    return out


@pytest.mark.parametrize(
    "privacy, between, beyond, add_remove, replace_one, eps_replace_one",
    [
        (GAUSSIAN, 0.022, 0.026, 0.0184, 0.0248, 1.44),  # the example: 0.0184 vs 0.0248 at FPR 1 %
        (LAPLACE, 0.026, 0.034, 0.0197, 0.0320, 1.85),
    ],
)
def test_a_point_between_the_add_remove_and_the_replace_one_curve_is_no_violation(
    privacy, between, beyond, add_remove, replace_one, eps_replace_one
):
    c = check(privacy, {"between": (0.01, between), "beyond": (0.01, beyond)})
    assert c.done and c.bound == "pld-curve+eps-delta-line" and c.violations == ["beyond"]
    assert c.relation == "replace-one" and "replace-one experiment" in c.relation_reason
    row = c.per_attack["between"]
    assert row.allowed_tpr_add_remove == pytest.approx(add_remove, abs=1e-4)  # what the old check allowed
    assert row.allowed_tpr_pld == pytest.approx(replace_one, abs=1e-4)
    assert row.within_line and row.within_pld and not row.violation
    assert c.per_attack["beyond"].violation and not c.per_attack["beyond"].within_pld
    # the line is the replace-one (ε, δ) at the run's δ, and the claim's group-privacy pair (2ε, (1 + e^ε)·δ)
    assert c.epsilon_replace_one == pytest.approx(eps_replace_one, abs=0.01) and c.delta_replace_one == 1e-5
    eps = privacy["epsilon"]
    assert c.lines[1] == pytest.approx([2 * eps, (1 + math.exp(eps)) * 1e-5])
    assert c.pld_epsilon_at_delta == pytest.approx(eps, rel=0.02)  # the add/remove cross-check is unchanged
    assert "REPLACE_ONE" in c.curve if privacy["scheme"] == "gaussian" else "remove and add legs" in c.curve


def test_the_line_alone_is_the_replace_one_line():
    """audit.pld_curve false: only the line, and it is the replace-one one (ε 1.44, not train.json's 0.997)."""
    line_ar = math.e**0.9974 * 0.01 + 1e-5  # 0.0272: the add/remove line at FPR 1 %
    c = check(GAUSSIAN, {"p": (0.01, 0.035)}, pld_curve=False)
    assert c.bound == "eps-delta-line" and c.per_attack["p"].within_pld is None
    assert c.per_attack["p"].allowed_tpr_line > 0.035 > line_ar and not c.violations


def test_without_sigma_q_steps_the_line_is_group_privacy_of_the_claim():
    """No σ, q or steps recorded: (2ε, (1 + e^ε)·δ) from train.json's (ε, δ); above its add/remove line is allowed."""
    c = check({**GAUSSIAN, "noise_multiplier": None}, {"p": (0.01, 0.04), "q": (0.01, 0.08)})
    assert c.bound == "eps-delta-line" and c.relation == "replace-one" and "group privacy" in c.curve
    eps, delta = 2 * 0.9974, (1 + math.exp(0.9974)) * 1e-5
    assert c.epsilon_replace_one == pytest.approx(eps) and c.delta_replace_one == pytest.approx(delta)
    assert c.per_attack["p"].allowed_tpr_line == pytest.approx(math.exp(eps) * 0.01 + delta)  # 0.0735
    assert c.per_attack["p"].allowed_tpr_add_remove == pytest.approx(math.exp(0.9974) * 0.01 + 1e-5)  # 0.0272
    assert c.violations == ["q"]


@pytest.mark.slow
def test_a_claim_below_what_sigma_q_steps_give_is_still_held_to_its_claim():
    """train.json claims ε = 0.05 but its σ, q, steps give ε ≈ 58: the claim's group-privacy pair catches it."""
    claimed = {**GAUSSIAN, "epsilon": 0.05, "noise_multiplier": 0.8, "sample_rate": 0.5, "steps": 100}
    c = check(claimed, {"p": (0.3, 0.6)})
    assert c.epsilon_replace_one > 50 and c.violations == ["p"]
    assert not c.per_attack["p"].within_line and c.per_attack["p"].within_pld


def test_largest_detectable_epsilon_at_500_per_group_and_5_attacks():
    """docs/privacy.md: with 500 + 500 evaluation images, 5 attacks at 95 % jointly, no attack can show ε above 4.54."""
    level = 1 - 0.05 / 5
    assert float(epsilon_lower_bound(500, 0, 500, 500, 1e-5, level)) == pytest.approx(4.54, abs=0.005)
