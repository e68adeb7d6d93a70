"""The audit's statistics: ROC counts, Clopper–Pearson intervals, the empirical ε bound and the check.

Pure numpy / scipy / scikit-learn on score arrays; the method is described in :mod:`dpcam.audit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpcam.privacy.profile import TradeOff, allowed_line

FPR_TARGETS = (0.01, 0.001)  # the TPR-at-low-FPR points reported (Carlini et al. 2022)


def clopper_pearson(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper–Pearson interval of a binomial proportion: ``(lower, upper)``.

    ``k`` successes out of ``n`` trials (int arrays broadcasting together, 0 ≤ k ≤ n, n ≥ 1);
    returns float64 arrays of the broadcast shape: ``lower = Beta⁻¹(α/2; k, n−k+1)`` (0 when k = 0)
    and ``upper = Beta⁻¹(1−α/2; k+1, n−k)`` (1 when k = n), α = 1 − ``confidence``.
    """
    from scipy.stats import beta

    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    alpha = 1.0 - confidence
    lo = np.zeros(k.shape)
    hi = np.ones(k.shape)
    some, notall = k > 0, k < n
    lo[some] = beta.ppf(alpha / 2, k[some], n[some] - k[some] + 1)
    hi[notall] = beta.ppf(1 - alpha / 2, k[notall] + 1, n[notall] - k[notall])
    return lo, hi


def roc_counts(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct threshold of the rule "member when score ≥ t", with its counts.

    ``member`` (n₁,) and ``nonmember`` (n₀,) float scores. Returns ``(thresholds, tp, fp)``:
    thresholds float64 ``(m+1,)`` descending, starting at +inf (flag nobody), then each distinct
    score; ``tp`` / ``fp`` int64 ``(m+1,)`` the members / non-members with score ≥ t.
    """
    m, o = np.sort(np.asarray(member, np.float64)), np.sort(np.asarray(nonmember, np.float64))
    t = np.concatenate([[np.inf], np.unique(np.concatenate([m, o]))[::-1]])
    tp = m.size - np.searchsorted(m, t, side="left")
    fp = o.size - np.searchsorted(o, t, side="left")
    return t, tp.astype(np.int64), fp.astype(np.int64)


def epsilon_lower_bound(tp, fp, n_member: int, n_nonmember: int, delta: float, confidence: float = 0.95) -> np.ndarray:
    """ε that (ε, δ)-DP would need to allow a threshold flagging ``tp`` members and ``fp`` non-members.

    ``max(log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo)))`` with TPR_lo the lower
    and FPR_hi the upper end of the two-sided Clopper–Pearson intervals at ``confidence`` (so the
    result holds with probability ≥ ``confidence``). ``tp``, ``fp``: int arrays of one shape; returns
    float64 of that shape, −inf where neither term has a positive numerator (not clamped at 0).
    """
    tpr_lo, _ = clopper_pearson(tp, n_member, confidence)
    _, fpr_hi = clopper_pearson(fp, n_nonmember, confidence)
    num1, num2 = tpr_lo - delta, 1.0 - fpr_hi - delta
    with np.errstate(divide="ignore"):
        a = np.where(num1 > 0, np.log(np.maximum(num1, 1e-300) / fpr_hi), -np.inf)
        b = np.where(num2 > 0, np.log(np.maximum(num2, 1e-300) / (1.0 - tpr_lo)), -np.inf)
    return np.maximum(a, b)


def allowed_tpr(fpr, epsilons, deltas) -> np.ndarray:
    """The largest TPR a membership test may reach at ``fpr`` under every (ε', δ(ε')) given.

    ``fpr`` float (m,); ``epsilons``, ``deltas`` float (g,) pairs of a privacy profile (one pair =
    the (ε, δ) line), for the neighbouring relation of the experiment, δ covering both orders.
    Returns float64 (m,) in [0, 1]: ``min over i of min(e^{εᵢ}·FPR + δᵢ, 1 − e^{−εᵢ}·(1 − FPR − δᵢ))``.
    """
    return allowed_line(fpr, epsilons, deltas)


def tpr_at_fpr(tp: np.ndarray, fp: np.ndarray, n_member: int, n_nonmember: int, target: float) -> float:
    """Largest TPR among ROC points (``roc_counts``) whose FPR is ≤ ``target``."""
    ok = fp / n_nonmember <= target + 1e-12
    return float((tp[ok] / n_member).max()) if ok.any() else 0.0


def _count_at(scores: np.ndarray, t: float) -> int:
    return int((scores >= t).sum())


# ------------------------------------------------------------------------------------ one attack


@dataclass
class AttackResult:
    """One attack's metrics (JSON-safe ``metrics``) and its evaluation-half ROC for the plot."""

    name: str
    metrics: dict[str, Any]
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)


def attack_metrics(
    name: str,
    sel_member: np.ndarray,
    sel_nonmember: np.ndarray,
    ev_member: np.ndarray,
    ev_nonmember: np.ndarray,
    delta: float,
    confidence: float,
) -> AttackResult:
    """Metrics of one attack's scores (higher = member); thresholds chosen on ``sel_*``, measured on ``ev_*``.

    All inputs float (n,) arrays. ``confidence``: the (already Bonferroni-adjusted) two-sided
    Clopper–Pearson level of this attack's bound. See :mod:`dpcam.audit` for each metric.
    """
    from sklearn.metrics import roc_auc_score

    n1, n0 = ev_member.size, ev_nonmember.size
    y = np.r_[np.ones(n1), np.zeros(n0)]
    auc = float(roc_auc_score(y, np.r_[ev_member, ev_nonmember]))

    t_sel, tp_sel, fp_sel = roc_counts(sel_member, sel_nonmember)
    youden = tp_sel / sel_member.size - fp_sel / sel_nonmember.size
    t_ba = float(t_sel[int(np.argmax(youden))])
    ba = 0.5 * (_count_at(ev_member, t_ba) / n1 + 1 - _count_at(ev_nonmember, t_ba) / n0)
    eps_sel = epsilon_lower_bound(tp_sel, fp_sel, sel_member.size, sel_nonmember.size, delta, confidence)
    t_eps = float(t_sel[int(np.argmax(eps_sel))])
    tp, fp = _count_at(ev_member, t_eps), _count_at(ev_nonmember, t_eps)
    tpr_lo = float(clopper_pearson(tp, n1, confidence)[0])
    fpr_hi = float(clopper_pearson(fp, n0, confidence)[1])
    eps_lb = float(epsilon_lower_bound(tp, fp, n1, n0, delta, confidence))

    _, tp_ev, fp_ev = roc_counts(ev_member, ev_nonmember)
    metrics = {
        "auc": auc,
        "balanced_accuracy": float(ba),
        "balanced_accuracy_oracle": float(np.max(0.5 * (tp_ev / n1 + 1 - fp_ev / n0))),
        **{f"tpr_at_fpr_{f:g}": tpr_at_fpr(tp_ev, fp_ev, n1, n0, f) for f in FPR_TARGETS},
        "epsilon_lb": max(0.0, eps_lb),
        "threshold": t_eps if math.isfinite(t_eps) else None,
        "tp": tp,
        "fp": fp,
        "tpr": tp / n1,
        "fpr": fp / n0,
        "tpr_lo": tpr_lo,
        "fpr_hi": fpr_hi,
    }
    return AttackResult(name, metrics, fp_ev / n0, tp_ev / n1)


# ------------------------------------------------------------------------------------ the check


def check_points(
    points: dict[str, tuple[float, float]],
    epsilon: float | Sequence[float],
    delta: float | Sequence[float],
    curve: TradeOff | tuple[np.ndarray, np.ndarray] | None = None,
    add_remove: TradeOff | tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each attack's conservative point (FPR_hi, TPR_lo) against the (ε, δ) line and, if given, a trade-off curve.

    ``epsilon``, ``delta``: one (ε, δ) pair or sequences of pairs, all checked (the line is the tightest
    of them at each FPR). They and ``curve`` (a :class:`~dpcam.privacy.profile.TradeOff`, or a profile
    ``(epsilons, deltas)``) must be stated for the relation of the experiment: replace-one for the
    audit (members against non-members of one model). ``add_remove``, the curve of the relation the
    run's ε is stated for, is only recorded for comparison, never checked. Returns ``{attack:
    {"allowed_tpr_line", "within_line", "allowed_tpr_pld", "within_pld", "allowed_tpr_add_remove",
    "violation"}}`` (the pld keys None without a curve, the last None without ``add_remove``).
    A point on the boundary is within.
    """
    out = {}
    for name, (fpr_hi, tpr_lo) in points.items():
        line = float(allowed_tpr([fpr_hi], np.atleast_1d(epsilon), np.atleast_1d(delta))[0])
        row = {
            "allowed_tpr_line": line,
            "within_line": bool(tpr_lo <= line + 1e-12),
            "allowed_tpr_pld": None,
            "within_pld": None,
            "allowed_tpr_add_remove": None if add_remove is None else _allowed(add_remove, fpr_hi),
        }
        if curve is not None:
            allowed = _allowed(curve, fpr_hi)
            row["allowed_tpr_pld"], row["within_pld"] = allowed, bool(tpr_lo <= allowed + 1e-12)
        row["violation"] = not row["within_line"] or row["within_pld"] is False
        out[name] = row
    return out


def _allowed(curve: TradeOff | tuple[np.ndarray, np.ndarray], fpr: float) -> float:
    if isinstance(curve, TradeOff):
        return float(curve.allowed_tpr([fpr])[0])
    return float(allowed_tpr([fpr], *curve)[0])
