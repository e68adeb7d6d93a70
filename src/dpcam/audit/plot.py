"""roc.png: every attack's evaluation-half ROC beside the region the run's replace-one guarantee allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpcam.audit.stats import AttackResult, allowed_tpr
from dpcam.layout import write_atomic
from dpcam.privacy.profile import TradeOff
from dpcam.records import AuditRecord


def save_roc(
    path: Path,
    results: dict[str, AttackResult],
    record: AuditRecord,
    curve: TradeOff | None = None,
    add_remove: TradeOff | None = None,
) -> Path:
    """Log-log ROC of every attack on the evaluation half, the checked points, chance, and the bounds.

    The checked bounds are replace-one (the record's line, and ``curve`` when given); the add/remove
    curve the run's ε is stated for (``add_remove``) is drawn grey, for comparison only.
    """
    from matplotlib.figure import Figure

    n0 = record.evaluation_non_members
    lo = 0.5 / n0
    fig = Figure(figsize=(6.4, 5.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    grid = np.logspace(np.log10(lo), 0, 200)
    ax.plot(grid, grid, color="grey", lw=1, ls=":", label="chance")
    _bounds(ax, grid, record, curve, add_remove)
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
    ax.set_ylabel(f"true-positive rate (log; {record.evaluation_members} members)")
    ax.grid(alpha=0.3, which="both")
    ax.plot(
        [],
        [],
        marker="o",
        mfc="white",
        mec="grey",
        ls="none",
        label=f"checked point (FPR upper, TPR lower; {100 * record.confidence:.0f}% joint)",
    )
    ax.legend(fontsize=7, loc="lower right")
    title = f"{record.run_name}: membership inference (evaluation half)"
    if record.violation:
        title += "\nVIOLATION: an attack beats what the replace-one guarantee allows"
    ax.set_title(title, fontsize=9, color="red" if record.violation else "black")
    return write_atomic(path, fig.savefig)  # the temporary file keeps the .png suffix savefig reads


def _bounds(ax, grid: np.ndarray, record: AuditRecord, curve: TradeOff | None, add_remove: TradeOff | None) -> None:
    """The replace-one (ε, δ) line and curve (checked) and the add/remove curve (grey), for a checked run."""
    check = record.check
    if not check.done or check.epsilon_replace_one is None:
        return
    eps, delta = check.epsilon_replace_one, check.delta_replace_one
    lines = check.lines or [[eps, delta]]
    more = f" and {len(lines) - 1} more pair(s)" if len(lines) > 1 else ""
    ax.plot(
        grid,
        allowed_tpr(grid, [e for e, _ in lines], [d for _, d in lines]),
        color="black",
        ls="--",
        lw=1.3,
        label=f"allowed by replace-one ε = {eps:.3g}, δ = {delta:.2g}{more}",
    )
    if curve is not None:
        ax.plot(
            grid, curve.allowed_tpr(grid), color="black", lw=1.3, label="allowed by the replace-one trade-off curve"
        )
    if add_remove is not None:
        ax.plot(
            grid,
            add_remove.allowed_tpr(grid),
            color="grey",
            lw=1,
            ls="-.",
            label=f"add/remove curve of train.json's ε = {record.privacy.epsilon:.3g} (not the experiment's)",
        )
