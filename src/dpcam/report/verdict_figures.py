"""Pictures of the verdict: every measure's ε − ∞ as a forest plot (``fig_verdict.png``), the same per explanation
method (``fig_methods.png``), what privacy costs, split into budget, clipping and noise (``fig_cost_split.png``), and
the reliability diagram of each ε against ∞ (``fig_calibration.png``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from dpcam.errors import UserError
from dpcam.layout import format_eps
from dpcam.records import CALIBRATION_BINS, calibration_features
from dpcam.report.compare import (
    ACCURACY,
    AGREEMENT,
    EXCLUDED,
    EXPLANATION,
    HEADLINE,
    PARTS,
    QWK,
    RANDOMISATION,
    ROAD_GAP,
    label,
)
from dpcam.report.methods import ByMethod
from dpcam.report.paired import BETTER, WORSE
from dpcam.report.plotting import figure, finish
from dpcam.report.runs import Run
from dpcam.report.verdict import Verdict

# the measures drawn: test accuracy and the paper's three metrics (the table holds every headline metric)
DRAWN = ("test_accuracy", "avg_drop_pct", "increase_conf_pct", "masked_score_pct")
PART_COLORS = {"budget": "tab:grey", "clipping": "tab:orange", "noise": "tab:red"}


FOREST = (ACCURACY, QWK, *EXPLANATION, ROAD_GAP, RANDOMISATION, AGREEMENT)  # the tables' measures, accuracy first
MARK_COLORS = {BETTER: "tab:green", WORSE: "tab:red"}  # marked by the correction
LIGHT_COLORS = {BETTER: "#9fd89f", WORSE: "#f4a6a6"}  # the 95 % interval excludes 0, not marked after correction
FOREST_COLUMNS = 3
CORRECTIONS = {"bh": "Benjamini–Hochberg", "holm": "Holm"}


def fig_forest(v: Verdict, path: Path) -> Path | None:
    """The verdict as a picture: per measure a panel, per ε a point (mean over seeds of ε − ∞) with its 95 %
    interval, 0 (= as good as ε = ∞) a vertical line. Right is better on every panel: a measure where lower is
    better is drawn with its sign flipped. Green / red: marked better / worse by the verdict's multiplicity
    correction (the table's ▲ / ▼); light green / red, hollow: the interval excludes 0 but the correction does not
    mark it; grey: the interval holds 0. None when no ε has a measured difference."""
    keys = [m.key for m in FOREST if any(m.key in r.diffs and r.diffs[m.key].mean is not None for r in v.rows)]
    if not keys:
        return None
    nrows = -(-len(keys) // FOREST_COLUMNS)
    fig, axes = figure(nrows, FOREST_COLUMNS, w=4.0, h=0.45 * len(v.rows) + 1.3)
    y = np.arange(len(v.rows))
    for ax, key in zip(axes.ravel(), keys):
        m = label(key)
        sign = 1.0 if m.better == "higher" else -1.0
        for i, row in enumerate(v.rows):
            d = row.diffs.get(key)
            if d is None or d.mean is None:
                continue
            side = BETTER if d.improved else WORSE if d.worse else ""
            color = MARK_COLORS.get(d.mark) or LIGHT_COLORS.get(side, "tab:grey")
            if d.lo is not None:
                ax.plot(sorted((sign * d.lo, sign * d.hi)), [i, i], color=color, lw=2)
            hollow = side and not d.mark
            ax.plot([sign * d.mean], [i], "o", color=color, mfc="white" if hollow else color, ms=5)
        ax.axvline(0, color="black", lw=0.7)
        ax.set_yticks(y, [f"ε = {format_eps(r.epsilon)}" for r in v.rows], fontsize=8)
        note = " (sign flipped)" if sign < 0 else ""
        note += " (not in the answer)" if key in EXCLUDED else ""
        ax.set_title(textwrap.fill(m.label + note, 48), fontsize=9)
    for ax in axes.ravel()[len(keys) :]:
        ax.set_visible(False)
    return finish(
        fig,
        axes,
        path,
        f"{v.model}: ε − ∞ per measure, mean over {len(v.seeds)} seeds with its unadjusted 95 % interval; right of 0 ="
        " better\n"
        f"green / red: marked better / worse after {CORRECTIONS[v.config.marks]}; light, hollow: the interval "
        "excludes 0, unmarked; grey: it holds 0",
        False,
    )


STATE_COLORS = {"shown": "tab:green", "worse": "tab:red"}  # the answer's cells; grey otherwise


def fig_methods(b: ByMethod, margins: dict[str, float], path: Path) -> Path | None:
    """The forest plot per explanation method: a column per method, a row per measure the answer tests, per ε a
    point (ε − ∞, mean over seeds) with its interval at the method's level (1 − α/m), right = better (a lower-is-better
    measure drawn with its sign flipped), the margin a dashed line; coloured by the answer's cell (green: not worse
    shown, red: worse shown, grey: neither; hollow: a degenerate model)."""
    keys = [k for k in HEADLINE if any(k in r.diffs for v in b.verdicts for r in v.rows)]
    if not keys:
        return None
    fig, axes = figure(len(keys), len(b.verdicts), w=3.4, h=0.32 * len(b.verdicts[0].rows) + 1.0)
    for j, v in enumerate(b.verdicts):
        y = np.arange(len(v.rows))
        for i, key in enumerate(keys):
            ax, m = axes[i][j], label(key)
            sign = 1.0 if m.better == "higher" else -1.0
            for k, row in enumerate(v.rows):
                d = row.diffs.get(key)
                iv = None if d is None or d.mean is None else d.interval(b.alpha)
                if iv is None:
                    continue
                state = v.answer.cells.get((row.epsilon, key), "")
                color = STATE_COLORS.get(state, "tab:grey")
                ax.plot(sorted((sign * iv[0], sign * iv[1])), [k, k], color=color, lw=2)
                ax.plot([sign * d.mean], [k], "o", color=color, mfc="white" if state == "degenerate" else color, ms=4)
            ax.axvline(0, color="black", lw=0.7)
            ax.axvline(-margins[key], color="black", lw=0.7, ls="--")
            ax.set_yticks(y, [f"ε = {format_eps(r.epsilon)}" for r in v.rows], fontsize=7)
            ax.set_title(textwrap.fill(f"{v.method}: {m.label}" + (" (flipped)" if sign < 0 else ""), 44), fontsize=8)
    return finish(
        fig,
        axes,
        path,
        f"{b.model}: ε − ∞ per explanation method, intervals at {100 * (1 - b.alpha):.4g} % (Bonferroni over "
        f"{len(b.verdicts)} methods); right of 0 = better, dashed = the margin\ngreen: not worse shown; red: a loss "
        "beyond the margin shown; grey: neither",
        False,
    )


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
