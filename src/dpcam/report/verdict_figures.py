"""Pictures of the verdict: what privacy costs, split into budget, clipping and noise (``fig_cost_split.png``), and
the reliability diagram of each ε against ∞ (``fig_calibration.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpcam.errors import UserError
from dpcam.layout import format_eps
from dpcam.records import CALIBRATION_BINS, calibration_features
from dpcam.report.compare import PARTS, label
from dpcam.report.plotting import figure, finish
from dpcam.report.runs import Run
from dpcam.report.verdict import Verdict

# the measures drawn: test accuracy and the paper's three metrics (the table holds every headline metric)
DRAWN = ("test_accuracy", "avg_drop_pct", "increase_conf_pct", "masked_score_pct")
PART_COLORS = {"budget": "tab:grey", "clipping": "tab:orange", "noise": "tab:red"}


def fig_cost_split(v: Verdict, path: Path) -> Path | None:
    """Per measure a panel, per ε a group of three bars: the budget, clipping and noise parts of ε − ∞ (each a paired
    difference with its 95 % interval), and their sum ε − ∞ as a black diamond. Higher is better on every panel:
    a metric where lower is better is drawn with its sign flipped (a cost is always below 0). None without a split."""
    rows = [r for r in v.rows if r.split]
    if not rows:
        return None
    fig, axes = figure(1, len(DRAWN), w=4.2, h=3.8)
    x = np.arange(len(rows))
    width = 0.26
    for ax, key in zip(axes[0], DRAWN):
        m = label(key)
        sign = 1.0 if m.better == "higher" else -1.0
        for i, part in enumerate(PARTS):
            ds = [r.split[key][part] for r in rows]
            mean = np.array([sign * d.mean if d.mean is not None else np.nan for d in ds])
            lo = np.array([sign * (d.lo if sign > 0 else d.hi) if d.lo is not None else np.nan for d in ds])
            hi = np.array([sign * (d.hi if sign > 0 else d.lo) if d.lo is not None else np.nan for d in ds])
            ax.bar(x + (i - 1) * width, mean, width, color=PART_COLORS[part], label=part)
            ax.errorbar(x + (i - 1) * width, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="black", lw=0.8)
        total = [r.diffs[key] for r in rows]
        ax.plot(x, [sign * d.mean if d.mean is not None else np.nan for d in total], "kD", ms=5, label="ε − ∞ (sum)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [f"ε = {format_eps(r.epsilon)}\n{r.schedule}" for r in rows], fontsize=8)
        ax.set_title(m.label + (" (sign flipped: lower is better)" if sign < 0 else ""), fontsize=9)
    return finish(
        fig,
        axes,
        path,
        f"{v.model}: what privacy costs (ε − ∞ = budget + clipping + noise; bars: 95 % intervals; below 0 = a cost)",
        False,
    )


def _reliability(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Pooled over ``runs`` (seeds): per confidence bin its mean confidence, its accuracy and its image count."""
    try:
        preds = [r.predictions for r in runs]
    except UserError:
        return None
    if not preds or any("prob" not in p for p in preds):
        return None
    sums = sum(calibration_features(p["prob"], p["label"]).sum(0) for p in preds).reshape(CALIBRATION_BINS, 3)
    n = sums[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[:, 1] / n, sums[:, 2] / n, n


def fig_calibration(v: Verdict, reference: list[Run], path: Path) -> Path | None:
    """Reliability diagram: per ε (seeds pooled) and ε = ∞, each confidence bin's accuracy against its mean
    confidence (the diagonal is perfect calibration; below it, over-confident). None without probabilities."""
    curves = [("ε = ∞", reference)] + [(f"ε = {format_eps(r.epsilon)}", r.runs) for r in v.rows]
    drawn = [(name, rel) for name, runs in curves if (rel := _reliability(runs)) is not None]
    if not drawn:
        return None
    fig, axes = figure(1, 1, w=5.0, h=4.6)
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for name, (conf, acc, n) in drawn:
        ok = n > 0
        ax.plot(conf[ok], acc[ok], "o-", ms=3, label=name)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return finish(
        fig,
        axes,
        path,
        f"{v.model}: reliability ({CALIBRATION_BINS} equal-width bins, seeds pooled; below the diagonal = "
        "over-confident)",
        False,
    )
