"""Matplotlib helpers of the report's figures: mean ± CI lines over table columns, the ε = ∞ line, log axes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dpcam.families import Column
from dpcam.layout import format_eps
from dpcam.report.rows import DAGGER
from dpcam.report.stats import mean_ci

INF = math.inf


def figure(nrows: int = 1, ncols: int = 1, w: float = 6.4, h: float = 4.2):
    """A figure (no display needed) and its axes as a 2-D array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def series(ax, cols: Sequence[Column], key: str, label: str, color, marker: str = "o", ls: str = "-") -> list[float]:
    """Mean ± CI of ``key`` over the finite-x columns as one line; degenerate points hollow. Returns the xs drawn."""
    pts = []
    for c in cols:
        mean, half = mean_ci(c.values(key))
        if math.isfinite(c.x) and mean is not None:
            pts.append((c.x, mean, half or 0.0, c.degenerate))
    if not pts:
        return []
    pts.sort()
    xs, ms, hs, deg = map(list, zip(*pts))
    ax.errorbar(xs, ms, yerr=hs if any(hs) else None, color=color, marker=marker, ls=ls, capsize=3, label=label)
    for x, m, d in zip(xs, ms, deg):
        if d:
            ax.plot([x], [m], marker=marker, ls="none", ms=9, mfc="white", mec=color, mew=1.5)
    return xs


def inf_line(ax, col: Column | None, key: str, label: str, color) -> None:
    """The non-private (ε = ∞) value as a dashed horizontal line, its CI as a band."""
    if col is None:
        return
    mean, half = mean_ci(col.values(key))
    if mean is None:
        return
    ax.axhline(mean, ls="--", color=color, lw=1.2, label=label + (f" {DAGGER} degenerate" if col.degenerate else ""))
    if half:
        ax.axhspan(mean - half, mean + half, color=color, alpha=0.12, lw=0)


def log_x(ax, xs: Iterable[float], label: str) -> None:
    """A log x axis ticked at exactly ``xs`` (ε or C as run names write them)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({x for x in xs if math.isfinite(x) and x > 0})
    if not ticks:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_eps(x) for x in ticks])
    ax.set_xlabel(label)


def finish(fig, axes, path: Path, title: str, degenerate: bool) -> Path:
    """Grid, legends (with the hollow-marker key when ``degenerate``), title; saves to ``path``."""
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if degenerate:
            ax.plot([], [], marker="o", ls="none", mfc="white", mec="grey", label="hollow: degenerate model")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    return path


def inf_column(cols: Sequence[Column]) -> Column | None:
    """The ε = ∞ column, if any."""
    return next((c for c in cols if c.x == INF), None)


def colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]
