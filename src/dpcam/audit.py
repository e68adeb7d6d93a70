"""The audit stage: membership inference against a trained run, checked against its (ε, δ).

What an attacker learns about who was in the training set, measured beside the ε the accountant
promised. ``audit_run`` attacks one run, ``audit_family`` every run of one grid family and
``audit_grid`` every run of the grid (the DVC stage ``audit``: one process, since each process
spends ~8 s importing torch, Captum and MLflow); they write ``audit.json`` and ``roc.png`` to
``audits/<run>/`` (a single run) or ``audits/<family>/<run>/`` (a grid run; a top-level folder of
its own because DVC outputs cannot overlap the explain stage's ``metrics/<family>``), and log to
the training's MLflow run.

Data. Members are the training images the run actually used (its train split, or the
``train_size`` subset that ``train.fit`` drew with seed 0); non-members are the test split, which
the run never trained on (validation only picked the epoch, which is post-processing). Both come
from the run's own dataset (the local-DP derivative for ``ldp`` runs): up to ``max_per_group``
members drawn with ``seed``, and as many non-members *of each class* as there are members of it
(``sample_groups``), so both groups have one size n and one class mix. Each group is cut at random
into a *selection* half and an *evaluation* half.

Attacks (a score per image; higher means "member"), all computed batched on the plain model
(``train.load_model``; never with Opacus hooks):

- ``loss`` (Yeom et al. 2018): minus the cross-entropy loss of the true label.
- ``loss-calibrated``: the logit-scaled confidence ``φ = z_y − logsumexp_{k≠y} z_k`` (Carlini et al.
  2022's statistic) standardised per class, ``(φ − μ_c) / σ_c``, with μ_c and σ_c the mean and
  standard deviation of φ over the *selection-half non-members* of class c (all selection
  non-members when a class has fewer than 2 or no spread). A global threshold on it is a per-class
  threshold at equal per-class false-positive rate.
- ``gradcam-variance`` and ``gradcam-entropy`` (Shokri et al. 2021): the variance, and the entropy
  ``−Σ p log p`` of ``p = L / ΣL``, of the Grad-CAM map L of the true label
  (``dpcam.explain.gradcam.gradcam``, DESIGN.md §3; a constant map counts as uniform, entropy
  ``log(H·W)``); the attacker knows the candidate's label, as for the loss.
- ``input-gradient``: the L2 norm of the gradient of the loss with respect to the pixel-space input.

The explanation and gradient signals have no a-priori direction: the selection half decides it
(the signal or its negative, whichever has AUC ≥ 0.5 there); the loss attacks are fixed.

Metrics per attack, every one measured on the *evaluation* half only, so no number below is
chosen on the data it is reported on (choosing a threshold on the same data is optimistic):

- ``auc``: ROC AUC (scikit-learn).
- ``balanced_accuracy``: (TPR + TNR) / 2 at the threshold with the best balanced accuracy on the
  selection half; ``balanced_accuracy_oracle`` is the best over all thresholds of the evaluation
  half (optimistic, for comparison with papers that report it).
- ``tpr_at_fpr_0.01`` / ``tpr_at_fpr_0.001``: the largest TPR among the evaluation ROC's points with
  FPR ≤ 1% / 0.1% (Carlini et al. 2022). With fewer than 1000 non-members FPR 0.1% cannot be
  resolved and the value is the TPR at FPR = 0 (``fpr_resolution`` = 1 / non-members).
- ``epsilon_lb``: an empirical ε lower bound. For a threshold t with TP of n₁ members and FP of n₀
  non-members flagged, Clopper–Pearson intervals give TPR_lo (lower end) and FPR_hi (upper end);
  (ε, δ)-DP implies TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, so
  ``ε_lb = max(log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo)), 0)``. Both terms use
  the conservative ends (the lower bound of TNR is 1 − FPR_hi and the upper bound of FNR is
  1 − TPR_lo). The threshold maximises this on the selection half and the bound is computed on the
  evaluation half. Intervals are two-sided at level ``1 − (1 − confidence) / k`` for k attacks
  (Bonferroni), so every attack's bound *and their maximum* hold with probability ≥ ``confidence``.
  ``epsilon_lb_max_detectable`` is the largest bound these sample sizes could show at all.

The check (runs with a finite achieved ε in train.json: gaussian, laplace). Each attack's checked
point is its conservative (FPR_hi, TPR_lo) at the ε-threshold above. It must lie inside the
trade-off region the run's guarantee allows:

- the (ε, δ) line: TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, with the ε and δ of train.json;
- where the run records σ (or λ), q and steps: the tighter curve of its privacy profile,
  ``TPR ≤ min over ε' of min(e^{ε'}·FPR + δ(ε'), 1 − e^{−ε'}·(1 − FPR − δ(ε')))`` with δ(ε') from
  dp_accounting's pessimistic PLD of the Poisson-subsampled Gaussian (Laplace) mechanism composed
  ``steps`` times (add-or-remove neighbours, both directions), on a grid of ε'. Any grid gives a
  valid (if looser) curve, and the accountant's own (ε, δ) is one of its points. The profile's
  own ε at δ is compared with the recorded ε too: more than 5% above it is an accounting
  discrepancy, logged as a warning and noted in audit.json.

The allowed region only grows when FPR grows or TPR falls, so if the true (FPR, TPR) is inside,
the conservative point is too; under the guarantee a violation is reported with probability at
most 1 − ``confidence``. Checking every threshold of the evaluation ROC instead would raise false
alarms (a few members ranked first happen by chance), which is why one threshold per attack is
fixed on the selection half. A violation is never silent: an ERROR log line, ``"violation": true``
in audit.json, the MLflow tag ``dpcam.audit_violation=true`` on the training's run, and the CLI says
so (``--fail-on-violation`` also exits 1). It means a bug or a broken assumption.

Caveat, stated in every audit.json: the Clopper–Pearson intervals treat the sampled members and
non-members as independent draws. They are exchangeable (a random split of one distribution) but
share one trained model, so the bound is the usual one-model heuristic; a rigorous one-run audit
(Steinke, Nasr & Jagielski 2023) randomises each candidate's inclusion before training.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dpcam.errors import UserError

log = logging.getLogger("dpcam.audit")

AUDITS_ROOT = Path("audits")
ATTACKS = ("loss", "loss-calibrated", "gradcam-variance", "gradcam-entropy", "input-gradient")
GRADCAM_ATTACKS = ("gradcam-variance", "gradcam-entropy")
LEARNED_DIRECTION = ("gradcam-variance", "gradcam-entropy", "input-gradient")
MEMBER_WHEN = {"loss": "lower loss", "loss-calibrated": "higher class-standardised confidence"}
FPR_TARGETS = (0.01, 0.001)
PLD_GRID = 2001  # ε' grid points of the privacy-profile curve
ACCOUNTING_RTOL = 1.05  # warn when the rebuilt PLD's ε exceeds the recorded ε by more than 5 %
CAVEAT = ("Clopper-Pearson intervals treat the sampled members and non-members as independent draws; they are "
          "exchangeable (a random split) but share one model, so the bound is the usual one-model heuristic, "
          "not a one-run audit with randomised inclusion (Steinke, Nasr & Jagielski 2023)")


def _known_attacks(v: list[str]) -> list[str]:
    if not v:
        raise ValueError(f"give at least one attack; known: {', '.join(ATTACKS)}")
    unknown = [a for a in v if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    if len(set(v)) != len(v):
        raise ValueError("attacks repeat; list each once")
    return v


class AuditConfig(BaseModel):
    """The ``audit`` section of params.yaml: membership-inference audit of a trained run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_per_group: int = Field(1000, ge=10, description="members and non-members sampled, each (≤ train and test split sizes)")
    attacks: Annotated[list[str], AfterValidator(_known_attacks)] = Field(default_factory=lambda: list(ATTACKS))
    confidence: float = Field(0.95, gt=0.5, lt=1, description="joint Clopper-Pearson level of the ε bound and the check")
    pld_curve: bool = Field(True, description="check DP runs against their PLD trade-off curve, not only the (ε, δ) line")
    layer: str | None = Field(None, description="Grad-CAM layer (dotted module name); None = the model's registered layer")
    batch_size: int = Field(128, ge=1)
    seed: int = Field(0, description="seed of the member / non-member samples and their halves")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def load_config(overrides: dict[str, Any] | None = None, path: Path | None = None) -> AuditConfig:
    """The ``audit`` section of ``path`` (default params.yaml) with CLI ``overrides``; one-line UserError if invalid."""
    from dpcam import config

    config.SECTIONS.setdefault("audit", AuditConfig)  # no-op once config.py registers the section itself
    return config.load_section("audit", overrides, config.PARAMS_FILE if path is None else path)


# ------------------------------------------------------------------------------------------ statistics


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
    the (ε, δ) line). Returns float64 (m,) in [0, 1]:
    ``min over i of min(e^{εᵢ}·FPR + δᵢ, 1 − e^{−εᵢ}·(1 − FPR − δᵢ))``.
    """
    a = np.asarray(fpr, np.float64).reshape(-1, 1)
    e = np.asarray(epsilons, np.float64).reshape(1, -1)
    d = np.asarray(deltas, np.float64).reshape(1, -1)
    with np.errstate(over="ignore"):
        up = np.minimum(np.exp(e) * a + d, 1.0 - np.exp(-e) * (1.0 - a - d))
    return np.clip(up.min(axis=1), 0.0, 1.0)


def privacy_profile(scheme: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    epsilon: float | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        one = pld_lib.from_gaussian_mechanism(float(noise_multiplier), sampling_prob=float(sample_rate),
                                              value_discretization_interval=vdi)
    elif scheme == "laplace":
        one = pld_lib.from_laplace_mechanism(float(noise_multiplier), sensitivity=1, sampling_prob=float(sample_rate),
                                             value_discretization_interval=vdi)
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


def tpr_at_fpr(tp: np.ndarray, fp: np.ndarray, n_member: int, n_nonmember: int, target: float) -> float:
    """Largest TPR among ROC points (``roc_counts``) whose FPR is ≤ ``target``."""
    ok = fp / n_nonmember <= target + 1e-12
    return float((tp[ok] / n_member).max()) if ok.any() else 0.0


def _count_at(scores: np.ndarray, t: float) -> int:
    return int((scores >= t).sum())


@dataclass
class AttackResult:
    """One attack's metrics (JSON-safe ``metrics``) and its evaluation-half ROC for the plot."""

    name: str
    metrics: dict[str, Any]
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)


def attack_metrics(name: str, sel_member: np.ndarray, sel_nonmember: np.ndarray, ev_member: np.ndarray,
                   ev_nonmember: np.ndarray, delta: float, confidence: float) -> AttackResult:
    """Metrics of one attack's scores (higher = member); thresholds chosen on ``sel_*``, measured on ``ev_*``.

    All inputs float (n,) arrays. ``confidence``: the (already Bonferroni-adjusted) two-sided
    Clopper–Pearson level of this attack's bound. See the module docstring for each metric.
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
        "tp": tp, "fp": fp, "tpr": tp / n1, "fpr": fp / n0, "tpr_lo": tpr_lo, "fpr_hi": fpr_hi,
    }
    return AttackResult(name, metrics, fp_ev / n0, tp_ev / n1)


# ------------------------------------------------------------------------------------------ signals


def compute_signals(model, data, attacks: list[str], *, batch_size: int, device, layer: str | None = None,
                    progress: bool = True, desc: str = "audit") -> dict[str, np.ndarray]:
    """Per-image attack signals of ``data`` (an ``ImageDataset``) on the plain ``model``, batched.

    Returns float64 (N,) arrays: ``loss`` (cross-entropy of the true label), ``confidence`` (logit-
    scaled φ = z_y − logsumexp_{k≠y} z_k), ``correct`` (1.0 where the prediction is the label),
    ``label``; with a Grad-CAM attack also ``gradcam_variance`` and ``gradcam_entropy`` (of the
    true label's [0, 1] map, entropy in nats of L / ΣL; a constant map counts as uniform); with
    ``input-gradient`` ``input_gradient`` (‖∂loss/∂x‖₂ in pixel space). ``model`` is used in eval
    mode with frozen parameters (restored afterwards); no Opacus hooks are allowed (``gradcam``
    checks). One forward + backward pass for the loss and input gradient, and Captum's for Grad-CAM.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from dpcam.explain.gradcam import check_plain, evaluating, gradcam

    check_plain(model, what="the membership-inference audit")
    want_cam = any(a in GRADCAM_ATTACKS for a in attacks)
    want_grad = "input-gradient" in attacks
    keys = ["loss", "confidence", "correct", "label"] + (["gradcam_variance", "gradcam_entropy"] if want_cam else []) \
        + (["input_gradient"] if want_grad else [])
    out = {k: np.empty(len(data), np.float64) for k in keys}
    bar = tqdm(total=len(data), desc=desc, disable=None if progress else True, leave=False)
    for start in range(0, len(data), batch_size):
        pos = np.arange(start, min(len(data), start + batch_size))
        x, y = (t.to(device) for t in data.batch(pos))
        with evaluating(model, freeze=True), torch.set_grad_enabled(want_grad):
            xg = x.clone().requires_grad_(want_grad)
            logits = model(xg)
            loss = F.cross_entropy(logits, y, reduction="none")
            if want_grad:
                (grad,) = torch.autograd.grad(loss.sum(), xg)  # x_i only reaches loss_i in eval mode
                out["input_gradient"][pos] = grad.flatten(1).norm(dim=1).double().cpu().numpy()
        logits, loss = logits.detach().double(), loss.detach().double()
        own = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        out["loss"][pos] = loss.cpu().numpy()
        out["confidence"][pos] = (own - torch.logsumexp(others, dim=1)).cpu().numpy()
        out["correct"][pos] = (logits.argmax(1) == y).double().cpu().numpy()
        out["label"][pos] = y.double().cpu().numpy()
        if want_cam:
            maps = gradcam(model, x, target=y, layer=layer)[0].flatten(1).double()
            out["gradcam_variance"][pos] = maps.var(dim=1, unbiased=False).cpu().numpy()
            mass = maps.sum(dim=1, keepdim=True)
            p = torch.where(mass > 0, maps / mass.clamp_min(1e-300), torch.full_like(maps, 1.0 / maps.shape[1]))
            out["gradcam_entropy"][pos] = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1).cpu().numpy()
        bar.update(len(pos))
    bar.close()
    return out


def attack_scores(signals: dict[str, np.ndarray], attack: str, calibration: np.ndarray) -> np.ndarray:
    """Scores (N,) of ``attack`` from ``compute_signals`` output; higher = member (before any learned flip).

    ``calibration``: bool (N,), the images whose statistics calibrate (the selection-half
    non-members); used by ``loss-calibrated`` only.
    """
    if attack == "loss":
        return -signals["loss"]
    if attack == "loss-calibrated":
        phi, labels = signals["confidence"], signals["label"]
        ref = phi[calibration]
        mu0, sd0 = ref.mean(), ref.std()
        mu = np.full(phi.shape, mu0)
        sd = np.full(phi.shape, sd0 if sd0 > 0 else 1.0)
        for c in np.unique(labels):
            mine = phi[calibration & (labels == c)]
            if mine.size >= 2 and mine.std() > 0:
                mu[labels == c], sd[labels == c] = mine.mean(), mine.std()
        return (phi - mu) / sd
    return signals[attack.replace("-", "_")].copy()


# ------------------------------------------------------------------------------------------ the check


def check_points(points: dict[str, tuple[float, float]], epsilon: float, delta: float,
                 profile: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Each attack's conservative point (FPR_hi, TPR_lo) against the (ε, δ) line and, if given, the profile curve.

    Returns ``{attack: {"allowed_tpr_line", "within_line", "allowed_tpr_pld", "within_pld", "violation"}}``
    (the pld keys None without a profile). A point on the boundary is within.
    """
    out = {}
    for name, (fpr_hi, tpr_lo) in points.items():
        line = float(allowed_tpr([fpr_hi], [epsilon], [delta])[0])
        row = {"allowed_tpr_line": line, "within_line": bool(tpr_lo <= line + 1e-12),
               "allowed_tpr_pld": None, "within_pld": None}
        if profile is not None:
            curve = float(allowed_tpr([fpr_hi], *profile)[0])
            row["allowed_tpr_pld"], row["within_pld"] = curve, bool(tpr_lo <= curve + 1e-12)
        row["violation"] = not row["within_line"] or row["within_pld"] is False
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------ the stage


def audit_dir(spec) -> Path:
    """``audits/<family>/<run>/`` of a grid ``RunSpec``."""
    return AUDITS_ROOT / spec.family / spec.name


def sample_groups(data, max_per_group: int, seed: int, train_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class-matched members and non-members of a ``PreparedDataset``: two sorted int64 index arrays of one size n.

    Members: up to ``max_per_group`` training images drawn at random (from the ``train_size``
    subset ``train.fit`` used, seed 0, when set). Non-members: for each class, as many test images
    of that class as there are members of it (members of a class the test split holds fewer of
    are dropped at random). Matching the class mix keeps a label-dependent signal (e.g. the loss of
    an untrained model) from passing for membership. UserError when n < 10.
    """
    train, test = data.split("train"), data.split("test")
    if train_size is not None:
        train = train.subset(train_size)  # exactly the images train.fit used (seed 0)
    rng = np.random.default_rng(seed)
    first = rng.permutation(train.indices)[: min(max_per_group, len(train))]
    labels = np.asarray(data.labels)
    members, nonmembers = [], []
    for c in np.unique(labels[first]):
        mine = first[labels[first] == c]
        pool = test.indices[labels[test.indices] == c]
        k = min(mine.size, pool.size)
        members.append(mine[:k])
        nonmembers.append(rng.choice(pool, k, replace=False))
    members, nonmembers = np.sort(np.concatenate(members)), np.sort(np.concatenate(nonmembers))
    if members.size < 10:
        raise UserError(f"{data.path}: the audit needs at least 10 class-matched training and test images "
                        f"(train {len(train)}, test {len(test)}, matched {members.size}); prepare a larger dataset")
    return members.astype(np.int64), nonmembers.astype(np.int64)


def audit_run(run: str, cfg: AuditConfig, *, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Audit ``run`` (a name under models/ or an MLflow run id); write ``out`` (default ``audits/<run>/``).

    Returns what audit.json holds: ``run_name``, ``privacy`` (scheme, ε, δ, σ, q, steps, accountant),
    ``members`` / ``non_members`` (sampled, each) and the halves' sizes, member and non-member
    accuracy and mean loss, ``attacks`` ``{name: metrics}``, the flat summary keys
    ``mia_auc`` (best attack), ``mia_auc_<attack>``, ``mia_epsilon_lb`` (largest bound, joint
    ``confidence``), ``mia_epsilon_lb_<attack>``, ``check`` and ``violation``, ``notes``.
    """
    from sklearn.metrics import roc_auc_score

    from dpcam.data.store import ImageDataset, load_dataset
    from dpcam.explain.gradcam import resolve_layer
    from dpcam.explain.score import resolve_run
    from dpcam.train import load_model, resolve_device, run_dir

    name = resolve_run(run)
    model, spec = load_model(name)
    resolve_layer(model, cfg.layer)  # an unknown layer fails before any work
    train_json = run_dir(name) / "train.json"
    try:
        train = json.loads(train_json.read_text()) if train_json.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{train_json}: not valid JSON ({e}); retrain the run with `dpcam train`") from None
    device = resolve_device(cfg.device)
    model.to(device)
    data = load_dataset(spec["data_dir"])
    members, nonmembers = sample_groups(data, cfg.max_per_group, cfg.seed, spec["config"].get("train_size"))
    n = members.size
    both = ImageDataset(data, np.concatenate([members, nonmembers]))
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    half = n // 2
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
    sel_pos = np.zeros(n, bool)
    sel_pos[perm[:half]] = True
    selection = np.r_[sel_pos, np.random.default_rng([cfg.seed, 2]).permutation(sel_pos)]
    notes = [CAVEAT]

    signals = compute_signals(model, both, cfg.attacks, batch_size=cfg.batch_size, device=device,
                              layer=cfg.layer, progress=progress, desc=f"audit {name}")

    scheme = train.get("scheme") or spec["config"].get("scheme")
    epsilon = train.get("epsilon")
    delta = float(train.get("delta") or spec["config"].get("delta") or 1e-5)
    private = epsilon is not None and math.isfinite(float(epsilon))
    level = 1 - (1 - cfg.confidence) / len(cfg.attacks)
    results: dict[str, AttackResult] = {}
    for attack in cfg.attacks:
        s = attack_scores(signals, attack, selection & ~is_member)
        if not np.isfinite(s).all():
            notes.append(f"{attack}: skipped, the model gives non-finite signals (diverged weights?)")
            continue
        member_when = MEMBER_WHEN.get(attack)
        if attack in LEARNED_DIRECTION:
            sel = selection
            flip = bool(np.ptp(s[sel]) > 0 and roc_auc_score(is_member[sel], s[sel]) < 0.5)
            s = -s if flip else s
            member_when = f"{'lower' if flip else 'higher'} {attack.replace('-', ' ')}"
        r = attack_metrics(attack, s[selection & is_member], s[selection & ~is_member],
                           s[~selection & is_member], s[~selection & ~is_member], delta, level)
        r.metrics["member_when"] = member_when
        results[attack] = r
    if not results:
        raise UserError(f"run {name}: every attack was skipped (non-finite model outputs); the model is broken, retrain it")

    n_eval_member = int((~selection & is_member).sum())
    n_eval_non = int((~selection & ~is_member).sum())
    max_lb = float(epsilon_lower_bound(n_eval_member, 0, n_eval_member, n_eval_non, delta, level))
    check: dict[str, Any] = {"done": False, "bound": None, "per_attack": {}, "confidence": cfg.confidence}
    profile = None
    if private:
        epsilon = float(epsilon)
        sigma, q, steps = train.get("noise_multiplier"), train.get("sample_rate"), train.get("steps")
        if cfg.pld_curve and scheme in ("gaussian", "laplace") and sigma and q and steps:
            profile = privacy_profile(scheme, float(sigma), float(q), int(steps), delta, epsilon)
            check["pld_epsilon_at_delta"] = pld_eps = _pld_epsilon(profile, delta)
            if pld_eps is not None and pld_eps > ACCOUNTING_RTOL * epsilon + 1e-3:
                why = (f"the PLD rebuilt from σ/λ = {sigma:g}, q = {q:.4g}, {steps} steps gives ε = {pld_eps:.4g} at "
                       f"δ = {delta:g}, above the ε = {epsilon:.4g} train.json records: check the run's accounting")
                log.warning("%s: %s", name, why)
                notes.append(why)
        elif cfg.pld_curve:
            notes.append("privacy-profile curve skipped: train.json lacks σ, q or steps; checked the (ε, δ) line only")
        per = check_points({a: (r.metrics["fpr_hi"], r.metrics["tpr_lo"]) for a, r in results.items()},
                           epsilon, delta, profile)
        check.update(done=True, bound="pld-curve+eps-delta-line" if profile is not None else "eps-delta-line",
                     per_attack=per, violations=[a for a, row in per.items() if row["violation"]])
    else:
        if scheme in ("gaussian", "laplace"):
            why = f"{train_json} records no achieved ε for this {scheme} run"
            log.warning("%s: not checked against a privacy bound: %s; retrain it with `dpcam train`", name, why)
        else:
            why = "local-DP data, no DP-SGD guarantee on the model" if scheme == "ldp" else "not a DP-SGD run (ε = ∞)"
        check["reason"] = why
        notes.append(f"no check against a bound: {why}")
    violation = bool(check.get("violations"))

    auc = {a: r.metrics["auc"] for a, r in results.items()}
    lbs = {a: r.metrics["epsilon_lb"] for a, r in results.items()}
    result: dict[str, Any] = {
        "run_name": name,
        "dataset": spec["dataset"],
        "data_dir": spec["data_dir"],
        "privacy": {"scheme": scheme, "epsilon": epsilon if private else None, "delta": delta,
                    "noise_multiplier": train.get("noise_multiplier"), "sample_rate": train.get("sample_rate"),
                    "steps": train.get("steps"), "accountant": train.get("accountant")},
        "members": n, "non_members": n,
        "selection_members": int((selection & is_member).sum()), "selection_non_members": int((selection & ~is_member).sum()),
        "evaluation_members": n_eval_member, "evaluation_non_members": n_eval_non,
        "fpr_resolution": 1.0 / n_eval_non,
        "member_accuracy": float(signals["correct"][is_member].mean()),
        "non_member_accuracy": float(signals["correct"][~is_member].mean()),
        "member_loss": float(signals["loss"][is_member].mean()),
        "non_member_loss": float(signals["loss"][~is_member].mean()),
        "seed": cfg.seed,
        "confidence": cfg.confidence,
        "per_attack_confidence": level,
        "explained_class": "label",
        "attacks": {a: r.metrics for a, r in results.items()},
        "mia_auc": max(auc.values()),
        **{f"mia_auc_{a.replace('-', '_')}": v for a, v in auc.items()},
        "mia_epsilon_lb": max(lbs.values()),
        **{f"mia_epsilon_lb_{a.replace('-', '_')}": v for a, v in lbs.items()},
        "epsilon_lb_max_detectable": max(0.0, max_lb),
        "check": check,
        "violation": violation,
        "notes": notes,
    }
    if violation:
        worst = max(check["violations"], key=lambda a: lbs[a])
        m = results[worst].metrics
        log.error("%s: AUDIT VIOLATION: membership attack %s reaches TPR ≥ %.4g at FPR ≤ %.4g (%.0f%% confidence), "
                  "beyond what ε = %.4g, δ = %.3g allows (empirical ε ≥ %.4g); this means a privacy bug or a broken "
                  "assumption (attacks over the bound: %s)", name, worst, m["tpr_lo"], m["fpr_hi"], 100 * cfg.confidence,
                  epsilon, delta, lbs[worst], ", ".join(check["violations"]))

    out = Path(out) if out is not None else AUDITS_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    save_roc(out / "roc.png", results, result, profile)
    _write_json(out / "audit.json", result)
    _log_to_mlflow(name, result, [out / "audit.json", out / "roc.png"])
    return result


def _pld_epsilon(profile: tuple[np.ndarray, np.ndarray], delta: float) -> float | None:
    """Smallest grid ε' of the profile with δ(ε') ≤ ``delta`` (None if none)."""
    eps, deltas = profile
    ok = deltas[:PLD_GRID] <= delta
    return float(eps[:PLD_GRID][ok].min()) if ok.any() else None


def audit_family(family: str, grid, cfg: AuditConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Audit every run of ``family`` in the grid into ``audits/<family>/<run>/`` (one process for all)."""
    import shutil

    from dpcam.config import family_runs

    results = []
    for spec in family_runs(grid, family, AUDITS_ROOT, trained=True):
        if audit_dir(spec).exists():
            shutil.rmtree(audit_dir(spec))
        results.append(audit_run(spec.name, cfg, out=audit_dir(spec), progress=progress))
    return results


def audit_grid(grid, cfg: AuditConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Audit every run of the grid, family by family, into ``audits/<family>/<run>/`` (the DVC stage ``audit``).

    Every run's model must exist before anything is written (UserError naming the first missing one).
    """
    from dpcam.config import FAMILIES, family_runs

    for family in FAMILIES:
        family_runs(grid, family, AUDITS_ROOT, trained=True)
    return [r for family in FAMILIES for r in audit_family(family, grid, cfg, progress=progress)]


# ------------------------------------------------------------------------------------------ outputs


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_roc(path: Path, results: dict[str, AttackResult], summary: dict[str, Any],
             profile: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """Log-log ROC of every attack on the evaluation half, the checked points, chance, and the bound(s) ε allows."""
    from matplotlib.figure import Figure

    n0 = summary["evaluation_non_members"]
    lo = 0.5 / n0
    fig = Figure(figsize=(6.4, 5.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    grid = np.logspace(np.log10(lo), 0, 200)
    ax.plot(grid, grid, color="grey", lw=1, ls=":", label="chance")
    priv = summary["privacy"]
    if priv["epsilon"] is not None:
        ax.plot(grid, allowed_tpr(grid, [priv["epsilon"]], [priv["delta"]]), color="black", ls="--", lw=1.3,
                label=f"allowed by ε = {priv['epsilon']:.3g}, δ = {priv['delta']:.2g}")
        if profile is not None:
            ax.plot(grid, allowed_tpr(grid, *profile), color="black", lw=1.3, label="allowed by the PLD trade-off curve")
    for (name, r), color in zip(results.items(), ("C0", "C1", "C2", "C3", "C4")):
        m = r.metrics
        fpr = np.maximum(r.fpr, lo)  # FPR 0 drawn at the axis edge
        ax.step(fpr, r.tpr, where="post", color=color, label=f"{name} (AUC {m['auc']:.3f}, ε ≥ {m['epsilon_lb']:.2f})")
        ax.plot([max(m["fpr_hi"], lo)], [max(m["tpr_lo"], lo)], marker="o", color=color, mfc="white", ls="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel(f"false-positive rate (log; {n0} non-members)")
    ax.set_ylabel(f"true-positive rate (log; {summary['evaluation_members']} members)")
    ax.grid(alpha=0.3, which="both")
    ax.plot([], [], marker="o", mfc="white", mec="grey", ls="none",
            label=f"checked point (FPR upper, TPR lower; {100 * summary['confidence']:.0f}% joint)")
    ax.legend(fontsize=7, loc="lower right")
    title = f"{summary['run_name']}: membership inference (evaluation half)"
    if summary["violation"]:
        title += "\nVIOLATION: an attack beats what ε allows"
    ax.set_title(title, fontsize=9, color="red" if summary["violation"] else "black")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _log_to_mlflow(name: str, result: dict[str, Any], artifacts: list[Path]) -> None:
    """Metrics ``mia_*``, tags ``dpcam.audit_violation`` / ``dpcam.audit_check`` and the files, on the training's run."""
    from dpcam import tracking
    from dpcam.train import training_run_id

    run_id = training_run_id(name)
    if not run_id:
        return
    numbers = {k: v for k, v in result.items() if k.startswith("mia_")}
    for attack, m in result["attacks"].items():
        a = attack.replace("-", "_")
        numbers.update({f"mia_{k}_{a}": v for k, v in m.items()
                        if k in ("auc", "balanced_accuracy", "epsilon_lb", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001")})
    numbers["mia_violation"] = float(result["violation"])
    check = result["check"]
    with tracking.run(result["dataset"], name, run_id=run_id):
        tracking.log_metrics(numbers)
        tracking.set_tags({"dpcam.audit_violation": str(result["violation"]).lower(),
                           "dpcam.audit_check": check["bound"] if check["done"] else f"none ({check['reason']})"})
        for path in artifacts:
            tracking.log_artifact(path, artifact_path="audit")
