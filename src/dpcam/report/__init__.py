"""The report stage: the paper's tables and figures over the whole grid, and one static HTML page.

Reads, for every run of the ``grid`` section (:func:`dpcam.families.grid_runs`), its typed stage
records (:mod:`dpcam.records`): ``models/<family>/<run>/train.json`` and
``metrics/<family>/<run>/explain.json`` (+ ``maps.npy`` / ``map_indices.npy`` for the Grad-CAM
grids), and, where the audit stage has run, ``audits/<family>/<run>/audit.json`` (optional: without it
the audit rows, figure and section are left out), and writes under ``reports/``:

- ``tables/<table>.md`` and ``.csv``: one table per run family (:data:`dpcam.families.FAMILIES`: its
  stem, title and columns; Gaussian and Laplace DP-SGD, local DP, the clipping sweep, training-set
  sizes and the baselines) and model; each cell is the mean over seeds ± the 95% Student-t half-width
  ``t_{0.975, n-1} · s / √n`` (n = 1: the mean alone); the CSV is long-form (one row per model ×
  column × metric, numeric ``mean`` and ``ci95``);
- ``runs.csv``: one row per run, every numeric key of train.json, explain.json and audit.json flattened;
- ``metrics.json``: the verdict's few numbers, flat and short-named, for ``dvc metrics show`` and
  ``dvc exp show`` (:func:`dpcam.report.verdict.dvc_metrics`);
- ``plots/accuracy_vs_eps.csv`` and ``plots/explain_vs_eps.csv``: tidy, one row per
  (scheme, ε, model, seed), for ``dvc plots``;
- ``figures/*.png``: the paper's Figures 2-7 equivalents (matplotlib, no display needed);
- ``index.html``: every table and figure, the runs with their MLflow ids, privacy accounting,
  degenerate flags and local-DP guarantees, and the membership-inference audit (``dpcam audit``) with
  any violation of a run's ε; inline CSS, no scripts, opens offline.

Audit rows (MIA AUC per attack, empirical ε lower bound) join the family tables when audit.json exists
for at least one run of the table; ``figures/fig_leakage_vs_eps.png`` plots them against ε.

Everything is built in a temporary folder next to ``reports/`` first; only when all of it is
written are the report's own entries swapped in (other files under ``reports/``, such as the
``ldp-figure`` stage's ``ldp-<dataset>.png``, are left alone). Missing inputs fail before anything
is written.

Modules: :mod:`~dpcam.report.runs` (the runs and their records), :mod:`~dpcam.report.stats` (mean and
CI), :mod:`~dpcam.report.rows` (what the tables show), :mod:`~dpcam.report.tables`,
:mod:`~dpcam.report.flat` (runs.csv, metrics.json, plots), :mod:`~dpcam.report.plotting` and
:mod:`~dpcam.report.figures`, :mod:`~dpcam.report.page` (index.html) and :mod:`~dpcam.report.stage`.
"""

from __future__ import annotations

from dpcam.report.figures import FIGURE_NAMES, fig_cams
from dpcam.report.page import render_html
from dpcam.report.rows import AUDIT_ROWS, DAGGER, DEGENERATE_NOTE, ROWS, Row
from dpcam.report.runs import Run, load_runs
from dpcam.report.stage import OWNED, report
from dpcam.report.stats import format_cell, mean_ci
from dpcam.report.tables import Table, build_tables

__all__ = [
    "AUDIT_ROWS",
    "DAGGER",
    "DEGENERATE_NOTE",
    "FIGURE_NAMES",
    "OWNED",
    "ROWS",
    "Row",
    "Run",
    "Table",
    "build_tables",
    "fig_cams",
    "format_cell",
    "load_runs",
    "mean_ci",
    "render_html",
    "report",
]
