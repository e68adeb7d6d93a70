"""The audit stage: one run (``audit_run``), a grid family (``audit_family``) or the grid (``audit_grid``).

``audit_run`` is a chain of named steps: open the run and sample its two groups, compute the signals,
score every attack, check the conservative points against the run's guarantee, then build, report
and write the :class:`~dpcam.records.AuditRecord`. The method: :mod:`dpcam.audit`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpcam import layout, records
from dpcam.audit.plot import save_roc
from dpcam.audit.signals import compute_signals, directed_scores, sample_groups
from dpcam.audit.stats import AttackResult, attack_metrics, check_points, epsilon_lower_bound
from dpcam.config import AuditConfig, GridConfig
from dpcam.errors import UserError
from dpcam.families import FAMILIES, family_runs, fresh
from dpcam.layout import AUDIT_JSON, AUDITS_ROOT, ROC_PNG, TRAIN_JSON
from dpcam.names import UNGUARANTEED_SCHEMES
from dpcam.privacy.profile import ADD_REMOVE, REPLACE_ONE, TradeOff, trade_off
from dpcam.records import AuditCheck, AuditPrivacy, AuditRecord, TrainRecord

log = logging.getLogger("dpcam.audit")

ACCOUNTING_RTOL = 1.05  # warn when the rebuilt PLD's ε exceeds the recorded ε by more than 5 %
PROFILE_SCHEMES = ("gaussian", "laplace")  # DP-SGD schemes with a privacy profile (and a recorded ε)
RELATION_REASON = (
    "members are training images and non-members test images of one model, so an attack's (FPR, TPR) compares "
    "training with a candidate against training with another image in its place: a replace-one experiment. "
    "train.json's ε is for add-or-remove-one neighbours (Opacus, dp_accounting); checking against it would raise "
    "false violations, so the line and curve here are the run's replace-one (ε, δ) and trade-off curve"
)
MLFLOW_METRICS = ("auc", "balanced_accuracy", "epsilon_lb", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001")  # per attack
CAVEAT = (
    "Clopper-Pearson intervals treat the sampled members and non-members as independent draws; they are "
    "exchangeable (a random split) but share one model, so the bound is the usual one-model heuristic, "
    "not a one-run audit with randomised inclusion (Steinke, Nasr & Jagielski 2023)"
)


@dataclass
class _Target:
    """One run under audit: its model, what model.json and train.json say, and the sampled images.

    ``data`` holds the n members then the n non-members; ``is_member`` and ``selection`` are bool
    (2n,): which are members, and which lie in the selection half (the rest is the evaluation half).
    """

    name: str
    model: Any
    spec: dict[str, Any]  # model.json
    train: TrainRecord | None  # None when the run has no train.json
    train_json: Path
    device: Any
    data: Any
    is_member: np.ndarray
    selection: np.ndarray
    notes: list[str] = field(default_factory=lambda: [CAVEAT])
    data_change: str | None = None

    def count(self, member: bool, selection: bool) -> int:
        return int(((self.is_member == member) & (self.selection == selection)).sum())


def audit_run(
    run: str, cfg: AuditConfig, *, out: Path | None = None, progress: bool = True, allow_data_change: bool = False
) -> AuditRecord:
    """Audit ``run`` (a name under models/ or an MLflow run id); write ``out`` (default ``audits/<run>/``).

    The run's data must be the data it was trained on (its members and non-members are read from it);
    ``allow_data_change`` goes on anyway, noted in audit.json (``data_change`` and ``notes``).

    Returns the :class:`~dpcam.records.AuditRecord` written to audit.json: privacy (scheme, ε, δ, σ, q,
    steps, accountant), group and half sizes, member and non-member accuracy and loss, ``attacks``
    ``{name: metrics}``, the flat summary ``mia_auc`` (best attack), ``mia_auc_<attack>``,
    ``mia_epsilon_lb`` (largest bound, joint ``confidence``), ``mia_epsilon_lb_<attack>``, ``check``,
    ``violation`` and ``notes``. Also writes roc.png and logs both to the training's MLflow run.
    """
    t = _open(run, cfg, allow_data_change)
    signals = compute_signals(
        t.model,
        t.data,
        cfg.attacks,
        batch_size=cfg.batch_size,
        device=t.device,
        layer=cfg.layer,
        progress=progress,
        desc=f"audit {t.name}",
    )
    privacy = _privacy(t)
    level = 1 - (1 - cfg.confidence) / len(cfg.attacks)  # Bonferroni: every attack's bound holds jointly
    results = _attack(t, signals, cfg.attacks, privacy.delta, level)
    check, curves = _check(t, cfg, results, privacy)
    record = _record(t, cfg, signals, privacy, level, results, check)
    if record.violation:
        _report_violation(record)
    _write(record, results, curves, Path(out) if out is not None else AUDITS_ROOT / t.name)
    return record


# ------------------------------------------------------------------------------------ the steps


def _open(run: str, cfg: AuditConfig, allow_data_change: bool = False) -> _Target:
    """Load the run, its train.json and data, and sample its members and non-members (fails before any work:
    also a tracking store fault, and data other than the run was trained on unless ``allow_data_change``)."""
    from dpcam import tracking
    from dpcam.data.store import ImageDataset, check_run_data, load_dataset
    from dpcam.explain.gradcam import resolve_layer
    from dpcam.saved import load_model, resolve_device

    name = layout.resolve_run(run, tracking.run_name_of)
    model, spec = load_model(name)
    resolve_layer(model, cfg.layer)  # an unknown layer fails before any work
    train_json = layout.run_dir(name) / TRAIN_JSON
    train = records.read(TrainRecord, train_json, f"run {name}") if train_json.is_file() else None
    device = resolve_device(cfg.device)
    if train is not None and train.mlflow_run_id:
        tracking.open_store()  # a store fault stops here, before audits/ is touched
    data = load_dataset(spec["data_dir"])
    change = check_run_data(name, data, allow=allow_data_change, image_size=spec.get("image_size"))
    model.to(device)
    members, nonmembers = sample_groups(data, cfg.max_per_group, cfg.seed, spec["config"].get("train_size"))
    is_member, selection = _halves(members.size, cfg.seed)
    both = ImageDataset(data, np.concatenate([members, nonmembers]))
    target = _Target(name, model, spec, train, train_json, device, both, is_member, selection, data_change=change)
    if change:
        target.notes.append(change)
    return target


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_member, selection)``, bool (2n,): n members then n non-members, each group cut at random in halves."""
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    perm = np.random.default_rng([seed, 1]).permutation(n)
    sel_pos = np.zeros(n, bool)
    sel_pos[perm[: n // 2]] = True
    selection = np.r_[sel_pos, np.random.default_rng([seed, 2]).permutation(sel_pos)]
    return is_member, selection


def _privacy(t: _Target) -> AuditPrivacy:
    """The guarantee train.json records (scheme and δ fall back to the run's config; ε None unless finite)."""
    train, config = t.train, t.spec["config"]
    epsilon = getattr(train, "epsilon", None)
    private = epsilon is not None and math.isfinite(float(epsilon))
    return AuditPrivacy(
        scheme=getattr(train, "scheme", None) or config.get("scheme"),
        epsilon=float(epsilon) if private else None,
        delta=float(getattr(train, "delta", None) or config.get("delta") or 1e-5),
        **{k: getattr(train, k, None) for k in ("noise_multiplier", "sample_rate", "steps", "accountant")},
    )


def _attack(
    t: _Target, signals: dict[str, np.ndarray], attacks: list[str], delta: float, level: float
) -> dict[str, AttackResult]:
    """Every attack's metrics (thresholds from the selection half, measured on the evaluation half)."""
    sel, mem = t.selection, t.is_member
    results: dict[str, AttackResult] = {}
    for attack in attacks:
        s, member_when = directed_scores(signals, attack, mem, sel)
        if not np.isfinite(s).all():
            t.notes.append(f"{attack}: skipped, the model gives non-finite signals (diverged weights?)")
            continue
        r = attack_metrics(attack, s[sel & mem], s[sel & ~mem], s[~sel & mem], s[~sel & ~mem], delta, level)
        r.metrics["member_when"] = member_when
        results[attack] = r
    if not results:
        raise UserError(
            f"run {t.name}: every attack was skipped (non-finite model outputs); the model is broken, retrain it"
        )
    return results


@dataclass
class _Curves:
    """The bounds of one run: its replace-one curve (checked) and add/remove curve (for comparison)."""

    replace_one: TradeOff | None
    add_remove: TradeOff | None
    lines: list[tuple[float, float]]  # the replace-one (ε, δ) pairs of the checked line, the run's own first
    checked: bool  # whether the replace-one curve is checked (audit.pld_curve), besides the line


def _check(
    t: _Target, cfg: AuditConfig, results: dict[str, AttackResult], privacy: AuditPrivacy
) -> tuple[AuditCheck, _Curves | None]:
    """Each attack's conservative point against the run's replace-one (ε, δ) line and trade-off curve."""
    check: dict[str, Any] = {"done": False, "bound": None, "per_attack": {}, "confidence": cfg.confidence}
    if privacy.epsilon is None:
        check["reason"] = _unchecked(t, privacy.scheme)
        return AuditCheck.model_validate(check), None
    curves = _curves(t, cfg, privacy, check)
    reference = curves.add_remove or (np.array([privacy.epsilon]), np.array([privacy.delta]))
    per = check_points(
        {a: (r.metrics["fpr_hi"], r.metrics["tpr_lo"]) for a, r in results.items()},
        [e for e, _ in curves.lines],
        [d for _, d in curves.lines],
        curves.replace_one if curves.checked else None,
        reference,
    )
    (eps, delta), *_ = curves.lines
    check.update(
        done=True,
        bound="pld-curve+eps-delta-line" if curves.checked else "eps-delta-line",
        per_attack=per,
        violations=[a for a, row in per.items() if row["violation"]],
        relation=REPLACE_ONE,
        relation_reason=RELATION_REASON,
        epsilon_replace_one=eps,
        delta_replace_one=delta,
        lines=[list(pair) for pair in curves.lines],
    )
    return AuditCheck.model_validate(check), curves


def _curves(t: _Target, cfg: AuditConfig, p: AuditPrivacy, check: dict[str, Any]) -> _Curves:
    """The run's replace-one bounds.

    The line: the replace-one ε at δ of the PLD rebuilt from train.json's σ (λ), q and steps, and the pair
    group privacy gives from train.json's claimed add/remove (ε, δ), (2ε, (1 + e^ε)·δ), so a train.json
    claiming less than its mechanism gives is still held to its claim (without σ, q or steps: that pair
    only, with a note). The curve: the replace-one trade-off curve of the same PLD. Also the add/remove
    PLD's ε at δ beside the recorded ε (a warning and a note when it is more than 5 % above).
    """
    claimed = _group_line(p.epsilon, p.delta)
    sigma, q, steps = p.noise_multiplier, p.sample_rate, p.steps
    if not (p.scheme in PROFILE_SCHEMES and sigma and q and steps):
        t.notes.append(
            "privacy-profile curve skipped: train.json lacks σ, q or steps; checked the replace-one (ε, δ) line "
            "that group privacy gives from the recorded add/remove (ε, δ): (2ε, (1 + e^ε)·δ)"
        )
        check["curve"] = "none: group privacy of train.json's add/remove (ε, δ), (2ε, (1 + e^ε)·δ), as the line"
        return _Curves(None, None, [claimed], checked=False)
    args = (p.scheme, float(sigma), float(q), int(steps), p.delta, p.epsilon)
    add_remove = trade_off(*args, relation=ADD_REMOVE)
    check["pld_epsilon_at_delta"] = pld_eps = add_remove.epsilon(p.delta)
    if pld_eps is not None and pld_eps > ACCOUNTING_RTOL * p.epsilon + 1e-3:
        why = (
            f"the PLD rebuilt from σ/λ = {sigma:g}, q = {q:.4g}, {steps} steps gives ε = {pld_eps:.4g} at "
            f"δ = {p.delta:g}, above the ε = {p.epsilon:.4g} train.json records: check the run's accounting"
        )
        log.warning("%s: %s", t.name, why)
        t.notes.append(why)
    replace_one = trade_off(*args, relation=REPLACE_ONE)
    check["curve"] = replace_one.method
    eps = replace_one.epsilon(p.delta)
    if eps is None:  # the profile's grid does not reach δ (not seen): the claim's group-privacy pair alone
        t.notes.append(f"the replace-one profile does not reach δ = {p.delta:g}; the line is (2ε, (1 + e^ε)·δ)")
        return _Curves(replace_one, add_remove, [claimed], cfg.pld_curve)
    return _Curves(replace_one, add_remove, [(eps, p.delta), claimed], cfg.pld_curve)


def _group_line(epsilon: float, delta: float) -> tuple[float, float]:
    """Replace-one (ε, δ) from add/remove (ε, δ): two add/remove steps, (2ε, (1 + e^ε)·δ).

    H_{e^{2ε}}(P‖R) ≤ H_{e^ε}(P‖Q) + e^ε·H_{e^ε}(Q‖R) for P, Q, R the runs on D ∪ {z}, D, D ∪ {z′}.
    """
    return 2 * epsilon, min(1.0, (1 + math.exp(min(epsilon, 700.0))) * delta)


def _unchecked(t: _Target, scheme: str | None) -> str:
    """Why a run without a finite ε is not checked (a warning for a DP-SGD run that should have one)."""
    if scheme in PROFILE_SCHEMES:
        why = f"{t.train_json} records no achieved ε for this {scheme} run"
        log.warning("%s: not checked against a privacy bound: %s; retrain it with `dpcam train`", t.name, why)
    elif scheme in UNGUARANTEED_SCHEMES:
        why = (
            f"{scheme} has no privacy guarantee (the paper's replica: L2 clipping with Laplace noise), so there is "
            "no ε to check; its attacks show what it leaks"
        )
    else:
        why = "local-DP data, no DP-SGD guarantee on the model" if scheme == "ldp" else "not a DP-SGD run (ε = ∞)"
    t.notes.append(f"no check against a bound: {why}")
    return why


def _record(
    t: _Target,
    cfg: AuditConfig,
    signals: dict[str, np.ndarray],
    privacy: AuditPrivacy,
    level: float,
    results: dict[str, AttackResult],
    check: AuditCheck,
) -> AuditRecord:
    """audit.json: sizes, accuracy and loss of both groups, every attack's metrics and their summary, the check."""
    n_eval_member, n_eval_non = t.count(True, False), t.count(False, False)
    max_lb = float(epsilon_lower_bound(n_eval_member, 0, n_eval_member, n_eval_non, privacy.delta, level))
    auc = {a: r.metrics["auc"] for a, r in results.items()}
    lbs = {a: r.metrics["epsilon_lb"] for a, r in results.items()}
    mem = t.is_member
    if check.epsilon_replace_one is not None and check.epsilon_replace_one >= max_lb:
        t.notes.append(
            f"the replace-one ε = {check.epsilon_replace_one:.3g} is at least the largest ε these sample sizes can "
            f"show ({max(0.0, max_lb):.3g}, all {n_eval_member} members flagged and no non-member): no attack can "
            "cross the (ε, δ) line here, only the trade-off curve, so a pass says little"
        )
    return AuditRecord(
        run_name=t.name,
        dataset=t.spec["dataset"],
        data_dir=t.spec["data_dir"],
        data_change=t.data_change,
        privacy=privacy,
        members=int(mem.sum()),
        non_members=int((~mem).sum()),
        selection_members=t.count(True, True),
        selection_non_members=t.count(False, True),
        evaluation_members=n_eval_member,
        evaluation_non_members=n_eval_non,
        fpr_resolution=1.0 / n_eval_non,
        member_accuracy=float(signals["correct"][mem].mean()),
        non_member_accuracy=float(signals["correct"][~mem].mean()),
        member_loss=float(signals["loss"][mem].mean()),
        non_member_loss=float(signals["loss"][~mem].mean()),
        seed=cfg.seed,
        confidence=cfg.confidence,
        per_attack_confidence=level,
        explained_class="label",
        attacks={a: r.metrics for a, r in results.items()},
        mia_auc=max(auc.values()),
        **{f"mia_auc_{a.replace('-', '_')}": v for a, v in auc.items()},
        mia_epsilon_lb=max(lbs.values()),
        **{f"mia_epsilon_lb_{a.replace('-', '_')}": v for a, v in lbs.items()},
        epsilon_lb_max_detectable=max(0.0, max_lb),
        check=check,
        violation=bool(check.violations),
        notes=t.notes,
    )


def _report_violation(r: AuditRecord) -> None:
    """The ERROR line of a violation, naming the attack with the largest bound among those over it."""
    worst = max(r.check.violations, key=lambda a: r.attacks[a].epsilon_lb)
    m = r.attacks[worst]
    log.error(
        "%s: AUDIT VIOLATION: membership attack %s reaches TPR ≥ %.4g at FPR ≤ %.4g (%.0f%% confidence), "
        "beyond what the run's replace-one guarantee allows (ε = %.4g, δ = %.3g; add/remove ε = %.4g) "
        "(empirical ε ≥ %.4g); this means a privacy bug or a broken assumption (attacks over the bound: %s)",
        r.run_name,
        worst,
        m.tpr_lo,
        m.fpr_hi,
        100 * r.confidence,
        r.check.epsilon_replace_one,
        r.check.delta_replace_one,
        r.privacy.epsilon,
        m.epsilon_lb,
        ", ".join(r.check.violations),
    )


def _write(record: AuditRecord, results: dict[str, AttackResult], curves: _Curves | None, out: Path) -> None:
    """roc.png and audit.json into ``out`` (atomically), then both to the training's MLflow run."""
    checked = curves.replace_one if curves is not None and curves.checked else None
    save_roc(out / ROC_PNG, results, record, checked, curves.add_remove if curves is not None else None)
    record.write(out / AUDIT_JSON)
    _log_to_mlflow(record, [out / AUDIT_JSON, out / ROC_PNG])


def _log_to_mlflow(record: AuditRecord, artifacts: list[Path]) -> None:
    """Metrics ``mia_*`` (with the checked replace-one ε), tags ``dpcam.audit_violation`` / ``dpcam.audit_check``
    / ``dpcam.audit_relation`` and the files, on the training's run."""
    from dpcam import tracking

    run_id = layout.training_run_id(record.run_name)
    if not run_id:
        log.warning("%s: no MLflow run id in its train.json; results are in files only", record.run_name)
        return
    view = record.to_json()
    numbers = {k: v for k, v in view.items() if k.startswith("mia_")}
    for attack, m in view["attacks"].items():
        numbers.update({f"mia_{k}_{attack.replace('-', '_')}": v for k, v in m.items() if k in MLFLOW_METRICS})
    numbers["mia_violation"] = float(record.violation)
    check = record.check
    tags = {
        "dpcam.audit_violation": str(record.violation).lower(),
        "dpcam.audit_check": check.bound if check.done else f"none ({check.reason})",
    }
    if check.done:
        tags["dpcam.audit_relation"] = check.relation
        numbers["mia_check_epsilon_replace_one"] = check.epsilon_replace_one
    tracking.log_to_run(run_id, record.dataset, numbers, tags, artifacts, "audit")


# ------------------------------------------------------------------------------------ families and the grid


def audit_family(
    family: str, grid: GridConfig, cfg: AuditConfig, *, progress: bool = True, allow_data_change: bool = False
) -> list[AuditRecord]:
    """Audit every run of ``family`` into a fresh ``audits/<family>/<run>/`` (one process for all).

    Every run's model must exist, the tracking store open and every run's data be its own before anything is
    written (:func:`_before_any_run`).
    """
    runs = family_runs(grid, family, AUDITS_ROOT, trained=True)
    return _audit_runs(runs, grid, cfg, progress, allow_data_change)


def _audit_runs(runs: list, grid: GridConfig, cfg: AuditConfig, progress: bool, allow: bool) -> list[AuditRecord]:
    from dpcam.executor import run_jobs

    _before_any_run(runs, allow)
    jobs = [(s.name, cfg, s.audit_dir, progress and grid.executor == "serial", allow) for s in runs]
    names = [s.name for s in runs]
    return run_jobs(_audit_fresh, jobs, names, stage="audit", describe=_audited, **grid.run_options())


def _audited(record: AuditRecord) -> str:
    """An audited run in a few words (the stage's progress line)."""
    return f"attack AUC {record.mia_auc:.3f}, ε lower bound {record.mia_epsilon_lb:.2f}" + (
        ", VIOLATION" if record.violation else ""
    )


def _before_any_run(runs: list, allow: bool) -> None:
    """The checks that must pass before any run's folder is emptied: the tracking store, every run's data."""
    from dpcam import guard, tracking
    from dpcam.data.store import check_run_data, load_dataset

    if runs:
        tracking.open_store()
    if not allow:
        for s in runs:
            spec = guard.read_json(s.model_dir / layout.MODEL_JSON, fix="train the run again (`dvc repro`)")
            check_run_data(s.name, load_dataset(spec["data_dir"]), allow=False, image_size=spec.get("image_size"))


def _audit_fresh(name: str, cfg: AuditConfig, out: Path, progress: bool, allow: bool = False) -> AuditRecord:
    return audit_run(name, cfg, out=fresh(out), progress=progress, allow_data_change=allow)


def audit_grid(
    grid: GridConfig, cfg: AuditConfig, *, progress: bool = True, allow_data_change: bool = False
) -> list[AuditRecord]:
    """Audit every run of the grid, family by family, into ``audits/<family>/<run>/`` (the DVC stage ``audit``).

    Every run's model must exist before anything is written (UserError naming the first missing one).
    """
    runs = [s for family in FAMILIES for s in family_runs(grid, family, AUDITS_ROOT, trained=True)]
    return _audit_runs(runs, grid, cfg, progress, allow_data_change)
