"""The audit stage: membership inference against a trained run, checked against its (ε, δ).

What an attacker learns about who was in the training set, measured beside the ε the accountant
promised. ``audit_run`` attacks one run, ``audit_family`` every run of one grid family and
``audit_grid`` every run of the grid (the DVC stage ``audit``: one process, since each process
spends ~8 s importing torch, Captum and MLflow); they write ``audit.json`` (a
:class:`~dpcam.records.AuditRecord`) and ``roc.png`` to ``audits/<run>/`` (a single run) or
``audits/<family>/<run>/`` (a grid run; a top-level folder of its own because DVC outputs cannot
overlap the explain stage's ``metrics/<family>``), and log to the training's MLflow run.

The package, along the method's seams:

- :mod:`dpcam.audit.signals`: the member / non-member samples, per-image signals, the attack registry
  :data:`ATTACKS` and their scores;
- :mod:`dpcam.audit.stats`: ROC counts, Clopper–Pearson intervals, the metrics and the ε bound, the check;
- :mod:`dpcam.audit.stage`: the stage (``audit_run`` as a chain of named steps, families, the grid);
- :mod:`dpcam.audit.plot`: roc.png.

The trade-off curves the check uses are :func:`dpcam.privacy.profile.trade_off`.

Data. Members are the training images the run actually used (its train split, or the
``train_size`` subset that ``train.fit`` drew with seed 0); non-members are the test split, which
the run never trained on (validation only picked the epoch, which is post-processing). Both come
from the run's own dataset (the local-DP derivative for ``ldp`` runs): up to ``max_per_group``
members drawn with ``seed``, and as many non-members *of each class* as there are members of it
(``sample_groups``), so both groups have one size n and one class mix. Each group is cut at random
into a *selection* half and an *evaluation* half.

Attacks (a score per image; higher means "member"), all computed batched on the plain model
(``saved.load_model``; never with Opacus hooks):

- ``loss`` (Yeom et al. 2018): minus the cross-entropy loss of the true label.
- ``loss-calibrated``: the logit-scaled confidence ``φ = z_y − logsumexp_{k≠y} z_k`` (Carlini et al.
  2022's statistic) standardised per class, ``(φ − μ_c) / σ_c``, with μ_c and σ_c the mean and
  standard deviation of φ over the *selection-half non-members* of class c (all selection
  non-members when a class has fewer than 2 or no spread). A global threshold on it is a per-class
  threshold at equal per-class false-positive rate.
- ``gradcam-variance`` and ``gradcam-entropy`` (Shokri et al. 2021): the variance, and the entropy
  ``−Σ p log p`` of ``p = L / ΣL``, of the Grad-CAM map L of the true label
  (``dpcam.explain.gradcam.gradcam``, docs/metrics.md; a constant map counts as uniform, entropy
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
- ``epsilon_lb``: an empirical ε lower bound, for the replace-one relation of the experiment (below).
  For a threshold t with TP of n₁ members and FP of n₀ non-members flagged, Clopper–Pearson
  intervals give TPR_lo (lower end) and FPR_hi (upper end); (ε, δ)-DP implies TPR ≤ e^ε·FPR + δ
  and 1 − FPR ≤ e^ε·(1 − TPR) + δ, so
  ``ε_lb = max(log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo)), 0)``. Both terms use
  the conservative ends (the lower bound of TNR is 1 − FPR_hi and the upper bound of FNR is
  1 − TPR_lo). The threshold maximises this on the selection half and the bound is computed on the
  evaluation half. Intervals are two-sided at level ``1 − (1 − confidence) / k`` for k attacks
  (Bonferroni), so every attack's bound *and their maximum* hold with probability ≥ ``confidence``.
  ``epsilon_lb_max_detectable`` is the largest bound these sample sizes could show at all: every
  evaluation member flagged and no non-member, ``log((TPR_lo − δ) / FPR_hi)`` with TPR_lo = (α/2)^{1/n₁}
  and FPR_hi = 1 − (α/2)^{1/n₀} (about 4.5 at 500/500 evaluation members/non-members with 5
  attacks at 95 %). A run whose replace-one ε is above it cannot be caught by the line; audit.json
  notes so.

The neighbouring relation. A member is a training image and a non-member a test image of the same
model, so an attack's (FPR, TPR) compares training with a candidate z against training with
another image z′ in its place: a **replace-one** experiment. The ε a run records (train.json,
Opacus, dp_accounting) is for **add-or-remove-one** neighbours, and a replace-one neighbour is two
add/remove steps away, so checking against it would raise false violations and the "probability at
most 1 − confidence" statement would not follow. The check therefore uses the run's replace-one
bounds (``check.relation = "replace-one"``, ``check.epsilon_replace_one``; the add/remove ones are
recorded beside them for comparison, ``per_attack.*.allowed_tpr_add_remove``).

The check (runs with a finite achieved ε in train.json: gaussian, laplace). Each attack's checked
point is its conservative (FPR_hi, TPR_lo) at the ε-threshold above. It must lie inside the
trade-off region the run's replace-one guarantee allows:

- the (ε, δ) line: TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ for two replace-one pairs
  (``check.lines``): the replace-one ε at the run's δ of the PLD rebuilt from train.json's σ (λ), q
  and steps, and (2ε, (1 + e^ε)·δ), what group privacy gives from train.json's claimed add/remove
  (ε, δ), so a train.json that claims less than its σ, q and steps give is still held to its claim
  (without σ, q or steps, that pair alone);
- where the run records σ (or λ), q and steps (and ``audit.pld_curve``): the replace-one trade-off
  curve (:func:`dpcam.privacy.profile.trade_off`): for the Gaussian, dp_accounting's pessimistic
  PLD with ``NeighboringRelation.REPLACE_ONE``; for the Laplace mechanism, which dp_accounting
  cannot account under replace-one when subsampled, each step's remove and add legs composed
  (group privacy in f-DP form), then the steps composed by PLD. ``TPR ≤ curve(FPR)``. The
  add/remove profile's own ε at δ is compared with the recorded ε too: more than 5% above it is an
  accounting discrepancy, logged as a warning and noted in audit.json.

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

from dpcam.audit.plot import save_roc
from dpcam.audit.signals import ATTACKS, Attack, attack_scores, compute_signals, directed_scores, sample_groups
from dpcam.audit.stage import CAVEAT, audit_family, audit_grid, audit_run
from dpcam.audit.stats import (
    FPR_TARGETS,
    AttackResult,
    allowed_tpr,
    attack_metrics,
    check_points,
    clopper_pearson,
    epsilon_lower_bound,
    roc_counts,
    tpr_at_fpr,
)

__all__ = [
    "ATTACKS",
    "CAVEAT",
    "FPR_TARGETS",
    "Attack",
    "AttackResult",
    "allowed_tpr",
    "attack_metrics",
    "attack_scores",
    "audit_family",
    "audit_grid",
    "audit_run",
    "check_points",
    "clopper_pearson",
    "compute_signals",
    "directed_scores",
    "epsilon_lower_bound",
    "roc_counts",
    "sample_groups",
    "save_roc",
    "tpr_at_fpr",
]
