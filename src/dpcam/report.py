"""The report stage: the paper's tables and figures over the whole grid, and one static HTML page.

Reads, for every run of the ``grid`` section (``config.grid_runs``), ``models/<family>/<run>/train.json``
and ``metrics/<family>/<run>/explain.json`` (+ ``maps.npy`` / ``map_indices.npy`` for the Grad-CAM
grids), and, where the audit stage has run, ``audits/<family>/<run>/audit.json`` (optional: without it the
audit rows, figure and section are left out), and writes under ``reports/``:

- ``tables/<table>.md`` and ``.csv``: Table 1 (Gaussian) and Table 2 (Laplace) equivalents, local DP,
  the clipping sweep, training-set sizes and the baselines; one table per model; each cell is the
  mean over seeds ± the 95% Student-t half-width ``t_{0.975, n-1} · s / √n`` (n = 1: the mean alone);
  the CSV is long-form (one row per model × column × metric, numeric ``mean`` and ``ci95``);
- ``runs.csv``: one row per run, every numeric key of train.json and explain.json flattened;
- ``metrics.json``: ``{family: {run: {test_accuracy, epsilon, avg_drop_pct, ...}}}`` for ``dvc metrics``;
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
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpcam.config import GridConfig, RunSpec, format_eps, grid_runs
from dpcam.errors import UserError

INF = math.inf
DAGGER = "†"
DEGENERATE_NOTE = (f"{DAGGER} degenerate model in at least one seed (near-chance accuracy, one class for most "
                   "predictions, or outputs that barely change with the input): metrics not meaningful")
# the report's own entries under out/: only these are replaced
OWNED = ("index.html", "tables", "figures", "plots", "runs.csv", "metrics.json")
# the report's pictures in figures/ (other files found there are kept)
FIGURE_NAMES = frozenset({"fig2_ldp_cams.png", "fig3_accuracy_vs_eps.png", "fig4_ldp_explanations.png",
                          "fig5_gaussian_cams.png", "fig5_laplace_cams.png", "fig6a_masked_accuracy_vs_eps.png",
                          "fig6b_masked_accuracy_vs_clip.png", "fig_train_size.png", "fig_leakage_vs_eps.png"})


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    decimals: int


# Table rows, in the paper's order first (Average Drop, Increase in Confidence, masked score).
METRICS: tuple[Metric, ...] = (
    Metric("avg_drop_pct", "Average Drop % ↓", 2),
    Metric("increase_conf_pct", "Increase in Confidence % ↑", 2),
    Metric("masked_score_pct", "Masked score % ↑", 2),
    Metric("masked_accuracy_pct", "Masked accuracy % ↑", 2),
    Metric("test_accuracy", "Test accuracy ↑", 3),
    Metric("test_qwk", "QWK ↑", 3),
    Metric("pointing_game", "Pointing game ↑", 3),
    Metric("map_agreement", "Map agreement (vs ε = ∞)", 3),
    Metric("deletion_auc", "Deletion AUC ↓", 3),
    Metric("insertion_auc", "Insertion AUC ↑", 3),
)
# The audit column group: rows added to a table when some run of it has audit.json (dpcam.audit).
AUDIT_METRICS: tuple[Metric, ...] = (
    Metric("mia_auc_loss", "MIA AUC (loss) ↓", 3),
    Metric("mia_auc_loss_calibrated", "MIA AUC (calibrated loss) ↓", 3),
    Metric("mia_auc_gradcam_variance", "MIA AUC (Grad-CAM variance) ↓", 3),
    Metric("mia_auc_gradcam_entropy", "MIA AUC (Grad-CAM entropy) ↓", 3),
    Metric("mia_auc_input_gradient", "MIA AUC (input gradient) ↓", 3),
    Metric("mia_epsilon_lb", "Empirical ε lower bound (MIA, 95%)", 2),
)
EXPLAIN_KEYS = ("avg_drop_pct", "increase_conf_pct", "masked_score_pct", "masked_accuracy_pct", "pointing_game",
                "energy_pointing_game", "map_agreement", "deletion_auc", "insertion_auc", "randomisation_agreement")
SUMMARY_KEYS = ("test_accuracy", "epsilon", "avg_drop_pct", "increase_conf_pct", "masked_score_pct",
                "pointing_game", "map_agreement", "mia_auc", "mia_epsilon_lb")


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Run:
    """One grid run with its stage outputs: ``train`` (train.json), ``explain`` (explain.json) and
    ``audit`` (audit.json; empty when the run has not been audited)."""

    spec: RunSpec
    train: dict[str, Any]
    explain: dict[str, Any]
    audit: dict[str, Any] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        """``key`` from explain.json, else audit.json, else train.json, as a float (None when missing, null, NaN
        or not a number)."""
        v = self.explain.get(key, self.audit.get(key, self.train.get(key)))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    @property
    def degenerate(self) -> bool:
        return bool(self.explain.get("degenerate") or self.train.get("collapsed"))


def _read_json(path: Path, spec: RunSpec) -> dict[str, Any]:
    hint = "run `dvc repro` (or dpcam train/explain for it) first"
    if not path.is_file():
        raise UserError(f"grid run {spec.name}: missing {path}; {hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"grid run {spec.name}: {path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"grid run {spec.name}: {path} is not a JSON object; {hint}")
    return data


def load_runs(grid: GridConfig) -> list[Run]:
    """Every run of ``grid`` with its train.json, explain.json and (if present) audit.json; UserError naming
    the first missing required file or the first unreadable one.

    Also checks that each run's ``maps.npy`` and ``map_indices.npy`` exist (the Grad-CAM grids read them).
    """
    from dpcam.audit import audit_dir

    runs = []
    for spec in grid_runs(grid):
        train = _read_json(spec.model_dir / "train.json", spec)
        explain = _read_json(spec.metrics_dir / "explain.json", spec)
        for name in ("maps.npy", "map_indices.npy"):
            if not (spec.metrics_dir / name).is_file():
                raise UserError(f"grid run {spec.name}: missing {spec.metrics_dir / name}; "
                                "run `dvc repro` (or dpcam train/explain for it) first")
        audit_json = audit_dir(spec) / "audit.json"
        audit = _read_json(audit_json, spec) if audit_json.is_file() else {}
        runs.append(Run(spec, train, explain, audit))
    return runs


# ------------------------------------------------------------------------------------------ statistics
def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and the Student-t half-width of its ``level`` confidence interval over ``values`` (seeds).

    Half-width = t_{(1+level)/2, n-1} · s / √n with s the sample standard deviation (ddof = 1);
    None when n < 2. Mean None when ``values`` is empty.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, half


def format_cell(values: Sequence[float], decimals: int) -> str:
    """``"0.600 ± 1.271"`` (n ≥ 2), ``"0.600"`` (n = 1) or ``"—"`` (no value)."""
    mean, half = mean_ci(values)
    if mean is None:
        return "—"
    return f"{mean:.{decimals}f}" + (f" ± {half:.{decimals}f}" if half is not None else "")


# ------------------------------------------------------------------------------------------ tables
@dataclass
class Column:
    """One table column: the runs (seeds) it pools, its plot position ``x`` (ε, C; ∞ = non-private) and
    the line it belongs to in the figures (``group``: scheme, mechanism or training-set size)."""

    label: str
    runs: list[Run]
    x: float
    group: str

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if (v := r.value(key)) is not None]

    @property
    def degenerate(self) -> bool:
        return any(r.degenerate for r in self.runs)

    @property
    def header(self) -> str:
        return self.label + (f" {DAGGER}" if self.degenerate else "")


@dataclass
class Table:
    stem: str  # file stem under tables/
    title: str
    model: str
    columns: list[Column]
    caption: str = ""

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The table's rows: ``METRICS``, plus ``AUDIT_METRICS`` when some run of the table has been audited."""
        audited = any(r.audit for c in self.columns for r in c.runs)
        return METRICS + AUDIT_METRICS if audited else METRICS

    def cells(self) -> list[list[str]]:
        """Rows of formatted cells: the metric label, then one cell per column."""
        return [[m.label] + [format_cell(c.values(m.key), m.decimals) for c in self.columns] for m in self.metrics]


# (stem, title, family) of the report's tables, in page order
TABLE_KINDS = (
    ("table1_gaussian", "Table 1: global DP, Gaussian DP-SGD", "gaussian"),
    ("table2_laplace", "Table 2: global DP, Laplace (L1 clip)", "laplace"),
    ("table3_ldp", "Local DP: training on noised images", "ldp"),
    ("table4_clip_sweep", "Clipping bound C at fixed ε", "clip-sweep"),
    ("table5_train_size", "Training-set size (DP needs more data)", "train-size"),
    ("table6_baselines", "Baselines: non-private vs clipping only", "baseline"),
)


def _pick(runs: Iterable[Run], **attrs) -> list[Run]:
    return [r for r in runs if all(getattr(r.spec, k) == v for k, v in attrs.items())]


def _eps_col(label_eps: float, runs: list[Run], group: str, prefix: str = "") -> Column:
    label = prefix + ("ε = ∞" if label_eps == INF else f"ε = {format_eps(label_eps)}")
    return Column(label, runs, label_eps, group)


def build_tables(runs: list[Run], grid: GridConfig) -> tuple[list[Table], list[str]]:
    """The report's tables (one per kind and model, kinds without runs left out) and a note per skipped kind."""
    tables: list[Table] = []
    notes: list[str] = []
    for stem, title, family in TABLE_KINDS:
        made = 0
        for model in grid.models:
            mine = _pick(runs, family=family, model=model)
            if not mine:
                continue
            cols = _columns(family, mine, _pick(runs, model=model), grid)
            cols = [c for c in cols if c.runs]
            seeds = sorted({r.spec.seed for c in cols for r in c.runs})
            caption = (f"mean ± 95% CI (Student t) over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
                       else f"one seed ({seeds[0]}): no confidence interval")
            if family == "clip-sweep":
                caption += f"; all runs at ε = {format_eps(grid.clip_sweep.epsilon)}"
            tables.append(Table(stem, title, model, cols, caption))
            made += 1
        if not made:
            notes.append(f"{title}: skipped, the grid has no {family} runs")
    return tables, notes


def _columns(family: str, mine: list[Run], model_runs: list[Run], grid: GridConfig) -> list[Column]:
    """Columns of one family's table for one model (``model_runs``: every run of that model)."""
    none = _pick(model_runs, family="baseline", scheme="none")
    if family in ("gaussian", "laplace"):
        eps = sorted({r.spec.epsilon for r in mine})
        return [_eps_col(e, _pick(mine, epsilon=e), family) for e in eps] + [_eps_col(INF, none, "none")]
    if family == "ldp":
        def key(name: str) -> tuple[str, float]:
            r = _pick(mine, ldp=name)[0]
            return name.rsplit("-eps", 1)[0], r.spec.epsilon if r.spec.epsilon is not None else INF
        cols = []
        for name in sorted({r.spec.ldp for r in mine}, key=key):
            mech, e = key(name)
            if e == INF:  # a derivative name without a readable ε: tabulated, not plotted
                cols.append(Column(name, _pick(mine, ldp=name), math.nan, mech))
            else:
                cols.append(Column(f"{mech} ε = {format_eps(e)}", _pick(mine, ldp=name), e, mech))
        return cols + [Column("no LDP (ε = ∞)", none, INF, "none")]
    if family == "clip-sweep":
        eps = grid.clip_sweep.epsilon
        main = _pick(model_runs, family="gaussian", epsilon=eps)
        cols = [Column(f"C = {format_eps(c)}", _pick(mine, clip=c), c, "gaussian") for c in sorted({r.spec.clip for r in mine})]
        if main:
            c = float(main[0].train.get("max_grad_norm") or math.nan)
            cols.append(Column(f"C = {format_eps(c)} (main run)", main, c, "gaussian"))
        return sorted(cols, key=lambda col: col.x)
    if family == "train-size":
        sizes = sorted({r.spec.train_size for r in mine})
        full = [r for r in model_runs if r.spec.family in ("gaussian", "baseline")]
        n_full = next((int(r.train["train_size"]) for r in full if r.train.get("train_size")), None)
        full_label = f"n = {n_full} (all)" if n_full else "n = all"
        cols = []
        for e in sorted({r.spec.epsilon for r in mine if r.spec.epsilon is not None}) + ([INF] if _pick(mine, scheme="none") else []):
            scheme = "none" if e == INF else "gaussian"
            for n in sizes:
                cols.append(_eps_col(e, _pick(mine, scheme=scheme, epsilon=None if e == INF else e, train_size=n),
                                     f"n = {n}", prefix=f"n = {n}, "))
            main = none if e == INF else _pick(model_runs, family="gaussian", epsilon=e)
            cols.append(_eps_col(e, main, full_label, prefix=f"{full_label}, "))
        return cols
    # baselines
    words = {"none": "none (no clipping, no noise)", "clip-only": "clip-only (clipping, no noise)"}
    return [Column(words[s], _pick(mine, scheme=s), INF, s) for s in grid.baselines]


def table_markdown(tables: list[Table]) -> str:
    """One Markdown document for tables of one kind (a section per model)."""
    out = [f"# {tables[0].title}", ""]
    for t in tables:
        out += [f"## {t.model}", "", f"_{t.caption}_", "",
                "| metric | " + " | ".join(c.header for c in t.columns) + " |",
                "|---|" + "---:|" * len(t.columns)]
        out += ["| " + " | ".join(row) + " |" for row in t.cells()]
        out.append("")
    if any(c.degenerate for t in tables for c in t.columns):
        out += [DEGENERATE_NOTE, ""]
    return "\n".join(out)


def table_records(tables: list[Table]) -> list[dict[str, Any]]:
    """Long-form rows of tables of one kind: model, column, x, metric, mean, ci95 (n ≥ 2), n, degenerate."""
    rows = []
    for t in tables:
        for c in t.columns:
            for m in t.metrics:
                vals = c.values(m.key)
                mean, half = mean_ci(vals)
                rows.append({"model": t.model, "column": c.label, "group": c.group, "x": _num(c.x), "metric": m.key,
                             "mean": _num(mean), "ci95": _num(half), "n": len(vals), "seeds": len(c.runs),
                             "degenerate_runs": sum(r.degenerate for r in c.runs),
                             "runs": " ".join(r.spec.name for r in c.runs)})
    return rows


def _num(v: float | None, missing: str = "") -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return "inf" if v == INF else v


# ------------------------------------------------------------------------------------------ flat files
def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, float]]:
    """(dotted key, number) for every number or bool nested in ``obj`` (bools as 0/1; strings and nulls skipped)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}")
    elif isinstance(obj, bool):
        yield prefix, int(obj)
    elif isinstance(obj, (int, float)):
        yield prefix, obj


def runs_records(runs: list[Run]) -> list[dict[str, Any]]:
    """runs.csv rows: identity of the run, then every numeric key of train.json, then of explain.json
    (a key both have is prefixed ``explain.`` on the explain side), then of audit.json (all prefixed ``audit.``)."""
    rows = []
    for r in runs:
        s = r.spec
        row: dict[str, Any] = {"run": s.name, "family": s.family, "scheme": s.scheme, "model": s.model, "seed": s.seed,
                               "ldp": s.ldp or "", "grid_epsilon": _num(s.epsilon), "grid_clip": _num(s.clip),
                               "grid_train_size": _num(s.train_size), "degenerate": int(r.degenerate)}
        row.update(_flatten(r.train))
        for k, v in _flatten(r.explain):
            row[f"explain.{k}" if k in row else k] = v
        row.update({f"audit.{k}": v for k, v in _flatten(r.audit)})
        rows.append(row)
    return rows


def summary_metrics(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """metrics.json: ``{family: {run: {test_accuracy, epsilon (achieved), ..., degenerate}}}``; missing values left out."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        vals = {k: v for k in SUMMARY_KEYS if (v := r.value(k)) is not None}
        out.setdefault(r.spec.family, {})[r.spec.name] = {**vals, "degenerate": r.degenerate}
    return out


def plot_records(runs: list[Run], keys: Sequence[str], split: Sequence[str]) -> list[dict[str, Any]]:
    """Tidy rows for ``dvc plots``: one per (scheme, ε, model, seed) of the Gaussian, Laplace and baseline runs.

    ``epsilon`` is the target ε (``inf`` for the non-private runs, which a numeric axis drops);
    for each key in ``split`` there are also ``gaussian_<key>`` and ``laplace_<key>`` columns, set
    only on that scheme's rows, so ``dvc plots`` draws one series per scheme. Missing numbers are
    ``NaN``, never blank: Vega-Lite reads a blank as 0 but drops NaN (and ``inf``) points.
    """
    rows = []
    for r in runs:
        if r.spec.family not in ("gaussian", "laplace", "baseline"):
            continue
        row = {"scheme": r.spec.scheme, "epsilon": _num(INF if r.spec.epsilon is None else r.spec.epsilon),
               "model": r.spec.model, "seed": r.spec.seed, "run": r.spec.name,
               "epsilon_achieved": _num(r.value("epsilon"), "NaN"), "degenerate": int(r.degenerate)}
        row.update({k: _num(r.value(k), "NaN") for k in keys})
        for scheme in ("gaussian", "laplace"):
            row.update({f"{scheme}_{k}": row[k] if r.spec.scheme == scheme else "NaN" for k in split})
        rows.append(row)
    return sorted(rows, key=lambda d: (d["scheme"], float(d["epsilon"]), d["model"], d["seed"]))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """CSV with the union of the rows' keys as header (first-seen order); missing cells empty."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ figures
def _figure(nrows: int = 1, ncols: int = 1, w: float = 6.4, h: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _series(ax, cols: Sequence[Column], key: str, label: str, color, marker: str = "o", ls: str = "-") -> list[float]:
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


def _inf_line(ax, col: Column | None, key: str, label: str, color) -> None:
    """The non-private (ε = ∞) value as a dashed horizontal line, its CI as a band."""
    if col is None:
        return
    mean, half = mean_ci(col.values(key))
    if mean is None:
        return
    ax.axhline(mean, ls="--", color=color, lw=1.2, label=label + (f" {DAGGER} degenerate" if col.degenerate else ""))
    if half:
        ax.axhspan(mean - half, mean + half, color=color, alpha=0.12, lw=0)


def _log_x(ax, xs: Iterable[float], label: str) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({x for x in xs if math.isfinite(x) and x > 0})
    if not ticks:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_eps(x) for x in ticks])
    ax.set_xlabel(label)


def _finish(fig, axes, path: Path, title: str, degenerate: bool) -> Path:
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if degenerate:
            ax.plot([], [], marker="o", ls="none", mfc="white", mec="grey", label="hollow: degenerate model")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    return path


def _infcol(cols: Sequence[Column]) -> Column | None:
    return next((c for c in cols if c.x == INF), None)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def _by_model(tables: list[Table], stem: str) -> dict[str, Table]:
    return {t.model: t for t in tables if t.stem == stem}


def fig_accuracy_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 3/7: test accuracy vs ε, Gaussian (solid) vs Laplace (dashed-dotted), ∞ dashed."""
    g, la = _by_model(tables, "table1_gaussian"), _by_model(tables, "table2_laplace")
    if not g and not la:
        return None
    fig, axes = _figure()
    ax, xs, deg = axes[0, 0], [], False
    colors = _colors(2 * len(models))  # one colour per (model, scheme)
    for i, model in enumerate(models):
        color = colors[2 * i]
        for t, name, marker, ls, c2 in ((g.get(model), "Gaussian", "o", "-", colors[2 * i]),
                                        (la.get(model), "Laplace", "s", "-.", colors[2 * i + 1])):
            if t:
                xs += _series(ax, [c for c in t.columns if c.group != "none"], "test_accuracy", f"{model} {name}", c2, marker, ls)
                deg |= any(c.degenerate for c in t.columns)
        if (t := g.get(model) or la.get(model)) is not None:
            _inf_line(ax, _infcol(t.columns), "test_accuracy", f"{model} non-private (ε = ∞)", color)
    _log_x(ax, xs, "target ε (log scale)")
    ax.set_ylabel("test accuracy")
    return _finish(fig, axes, path, "Test accuracy vs ε: Gaussian vs Laplace DP-SGD", deg)


def fig_ldp_explanations(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 4: Average Drop and Increase in Confidence vs the data's ε, one line per mechanism, a panel per model."""
    ldp = _by_model(tables, "table3_ldp")
    if not ldp:
        return None
    shown = [m for m in models if m in ldp]
    fig, axes = _figure(2, len(shown), 5.0, 3.6)
    deg = False
    for j, model in enumerate(shown):
        t = ldp[model]
        groups = list(dict.fromkeys(c.group for c in t.columns if c.group != "none"))
        for i, (key, label) in enumerate((("avg_drop_pct", "Average Drop % (lower is better)"),
                                          ("increase_conf_pct", "Increase in Confidence % (higher is better)"))):
            ax, xs = axes[i, j], []
            for grp, color in zip(groups, _colors(len(groups))):
                xs += _series(ax, [c for c in t.columns if c.group == grp], key, grp, color)
            _inf_line(ax, _infcol(t.columns), key, "no LDP (ε = ∞)", "black")
            _log_x(ax, xs, "local-DP ε of the training images (log scale)")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=9)
        deg |= any(c.degenerate for c in t.columns)
    return _finish(fig, axes, path, "Explanations of models trained on local-DP images", deg)


def fig_masked_accuracy_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 6a: masked accuracy % vs ε (Gaussian), one line per model, ∞ dashed."""
    g = _by_model(tables, "table1_gaussian")
    if not g:
        return None
    fig, axes = _figure()
    ax, xs = axes[0, 0], []
    for model, color in zip(models, _colors(len(models))):
        if model in g:
            xs += _series(ax, [c for c in g[model].columns if c.group != "none"], "masked_accuracy_pct", model, color)
            _inf_line(ax, _infcol(g[model].columns), "masked_accuracy_pct", f"{model} non-private (ε = ∞)", color)
    _log_x(ax, xs, "target ε (log scale)")
    ax.set_ylabel("masked accuracy % (x ⊙ Grad-CAM classified correctly)")
    return _finish(fig, axes, path, "Masked accuracy vs ε (Gaussian DP-SGD)",
                   any(c.degenerate for t in g.values() for c in t.columns))


def fig_masked_accuracy_vs_clip(tables: list[Table], models: list[str], eps: float, path: Path) -> Path | None:
    """Paper Fig. 6b: masked accuracy % vs the clipping bound C at the sweep's ε."""
    cs = _by_model(tables, "table4_clip_sweep")
    if not cs:
        return None
    fig, axes = _figure()
    ax, xs = axes[0, 0], []
    for model, color in zip(models, _colors(len(models))):
        if model in cs:
            xs += _series(ax, cs[model].columns, "masked_accuracy_pct", model, color)
    _log_x(ax, xs, "clipping bound C (log scale)")
    ax.set_ylabel("masked accuracy %")
    return _finish(fig, axes, path, f"Masked accuracy vs clipping bound C at ε = {format_eps(eps)}",
                   any(c.degenerate for t in cs.values() for c in t.columns))


def fig_train_size(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Test accuracy and masked score vs ε, one line per training-set size (its non-private value dashed)."""
    ts = _by_model(tables, "table5_train_size")
    if not ts:
        return None
    fig, axes = _figure(1, 2, 5.2, 4.0)
    deg = False
    markers = "osD^v"
    for k, (key, label) in enumerate((("test_accuracy", "test accuracy"), ("masked_score_pct", "masked score %"))):
        ax, xs = axes[0, k], []
        for mi, model in enumerate(m for m in models if m in ts):
            t = ts[model]
            groups = list(dict.fromkeys(c.group for c in t.columns))
            for grp, color in zip(groups, _colors(len(groups))):
                cols = [c for c in t.columns if c.group == grp]
                name = grp if len(ts) == 1 else f"{model} {grp}"
                xs += _series(ax, cols, key, name, color, markers[mi % len(markers)])
                _inf_line(ax, _infcol(cols), key, f"{name}, ε = ∞", color)
            deg |= any(c.degenerate for c in t.columns)
        _log_x(ax, xs, "target ε (log scale)")
        ax.set_ylabel(label)
    return _finish(fig, axes, path, "DP needs more data: utility and explanations vs ε per training-set size", deg)


def fig_leakage_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Membership-inference leakage vs ε (Gaussian solid, Laplace dash-dotted; ε = ∞ dashed).

    Left: the best attack's ROC AUC (``mia_auc``; 0.5 = chance, dotted). Right: the empirical ε lower
    bound (``mia_epsilon_lb``) with the line y = ε: a point above it beats the guarantee (the audit
    flags it as a violation). x is the target ε. None when no Gaussian/Laplace run has been audited.
    """
    g, la = _by_model(tables, "table1_gaussian"), _by_model(tables, "table2_laplace")
    audited = [t for t in (*g.values(), *la.values()) if any(r.audit for c in t.columns for r in c.runs)]
    if not audited:
        return None
    fig, axes = _figure(1, 2, 5.2, 4.0)
    deg = any(c.degenerate for t in audited for c in t.columns)
    colors = _colors(2 * len(models))
    for k, (key, label) in enumerate((("mia_auc", "MIA AUC, best attack (0.5 = chance)"),
                                      ("mia_epsilon_lb", "empirical ε lower bound (95%)"))):
        ax, xs = axes[0, k], []
        for i, model in enumerate(models):
            for t, name, marker, ls, color in ((g.get(model), "Gaussian", "o", "-", colors[2 * i]),
                                               (la.get(model), "Laplace", "s", "-.", colors[2 * i + 1])):
                if t:
                    xs += _series(ax, [c for c in t.columns if c.group != "none"], key, f"{model} {name}", color, marker, ls)
            if (t := g.get(model) or la.get(model)) is not None:
                _inf_line(ax, _infcol(t.columns), key, f"{model} non-private (ε = ∞)", colors[2 * i])
        finite = sorted({x for x in xs if math.isfinite(x) and x > 0})
        if key == "mia_auc":
            ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
        elif finite:
            line = np.geomspace(finite[0], finite[-1], 50) if len(finite) > 1 else np.array(finite)
            ax.plot(line, line, color="black", ls="--", lw=1, marker="" if len(finite) > 1 else "x",
                    label="y = ε (above: violation)")
            ax.set_ylim(bottom=0)
        _log_x(ax, xs, "target ε (log scale)")
        ax.set_ylabel(label)
    return _finish(fig, axes, path, "Membership-inference leakage vs ε (dpcam audit)", deg)


def fig_cams(cols: list[Column], seed: int, path: Path, title: str, images: int = 4) -> tuple[Path | None, str | None]:
    """Paper Fig. 2/5: the same test images (rows) across runs of increasing ε (columns, ∞ last).

    Column 0 is the input (from the dataset of the non-LDP run when there is one); each further
    column is the run's own input (LDP runs: its noised image) overlaid with its Grad-CAM map
    (``maps.npy`` float16 (N, H, W), rows matched by ``map_indices.npy``). Uses the runs of ``seed``;
    rows are the first ``images`` test images every column's run scored. Returns (path, None), or
    (None, why) when there is nothing to draw.
    """
    from dpcam.data.store import load_dataset
    from dpcam.explain.score import overlay

    picked = [(c, r) for c in cols for r in c.runs if r.spec.seed == seed]
    if not picked:
        return None, f"{title}: skipped, no runs of seed {seed}"
    datasets: dict[str, Any] = {}
    loaded = []
    for c, r in picked:
        d = r.explain.get("data_dir")
        if not d:
            raise UserError(f"grid run {r.spec.name}: {r.spec.metrics_dir / 'explain.json'} has no data_dir; rerun `dpcam explain` for it")
        datasets.setdefault(d, load_dataset(d))
        loaded.append((c, r, datasets[d], np.load(r.spec.metrics_dir / "maps.npy", mmap_mode="r"),
                       np.load(r.spec.metrics_dir / "map_indices.npy")))
    common = loaded[0][4]
    for *_, idx in loaded[1:]:
        common = common[np.isin(common, idx)]
    chosen = common[:images]
    if chosen.size == 0:
        return None, f"{title}: skipped, its runs share no scored test image"
    clean = next((d for _, r, d, *_ in loaded if r.spec.scheme != "ldp"), loaded[0][2])
    fig, axes = _figure(len(chosen), len(loaded) + 1, 1.7, 1.7)
    for i, idx in enumerate(chosen):
        axes[i, 0].imshow(np.asarray(clean.images[idx]), interpolation="nearest")
        axes[i, 0].set_ylabel(clean.classes[int(clean.labels[idx])], fontsize=7)
        for j, (c, r, d, maps, midx) in enumerate(loaded, start=1):
            k = int(np.flatnonzero(midx == idx)[0])
            img = np.asarray(d.images[idx], dtype=np.float32) / 255
            axes[i, j].imshow(overlay(img, np.asarray(maps[k], dtype=np.float32)), interpolation="nearest")
            if i == 0:
                label = c.label.replace(" (", "\n(") if " (" in c.label else c.label.replace(" ε", "\nε")
                axes[i, j].set_title(label + ("\nDEGENERATE" if r.degenerate else ""), fontsize=7,
                                     color="red" if r.degenerate else "black")
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (seed {seed})", fontsize=9)
    fig.savefig(path, dpi=110)
    return path, None


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#1d232a}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:12.5px}th,td{border:1px solid #d5d9e0;padding:3px 7px;text-align:right}
th{background:#f1f3f6}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafbfc}
.wide{overflow-x:auto}.note{color:#555;font-size:12.5px}.deg{color:#b00020;font-weight:600}
figure{margin:1em 0}img{max-width:100%;border:1px solid #e3e6ea}figcaption{color:#555;font-size:12.5px}
code{background:#f3f4f6;padding:0 3px}nav a{margin-right:1em}
"""


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _g(v: Any, fmt: str = ".4g") -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def render_html(grid: GridConfig, runs: list[Run], tables: list[Table], figures: list[tuple[str, str]],
                notes: list[str], extra_figures: list[tuple[str, str]], search: bool = False) -> str:
    """The index page: ``figures`` and ``extra_figures`` are (relative src, caption) pairs.

    ``search``: link ``search/index.html`` (what ``dpcam search`` writes next to the report).
    """
    e = html.escape
    datasets = sorted({str(r.train.get("dataset", "?")) for r in runs})
    parts = [f"<h1>dpcam report: grid <code>{e(grid.name)}</code></h1>",
             ("<p>How much interpretability does differential privacy cost? The equivalents of the tables and figures of "
             "Naidu et al. (2021), <i>When Differential Privacy Meets Interpretability</i>, computed on "
             f"<b>{e(', '.join(datasets))}</b> for models <b>{e(', '.join(grid.models))}</b> and seeds "
             f"<b>{e(', '.join(map(str, grid.seeds)))}</b> ({len(runs)} runs). Cells are the mean over seeds "
             "± the half-width of its 95% confidence interval (Student t, t<sub>0.975,n−1</sub>·s/√n; no ± with one "
             "seed); ε = ∞ is the non-private run. Definitions of every metric: DESIGN.md §3.</p>"),
             f'<p class="note">{e(DEGENERATE_NOTE)}</p>',
             ('<nav><a href="#tables">Tables</a><a href="#figures">Figures</a><a href="#runs">Runs</a>'
             '<a href="#privacy">Privacy accounting</a><a href="#audit">Membership-inference audit</a>'
             '<a href="#ldp">Local-DP guarantees</a>' + ('<a href="search/index.html">Search: Pareto front</a>' if search else "")
             + '</nav>'),
             '<h2 id="tables">Tables</h2>']
    for t in tables:
        parts.append(f"<h3>{e(t.title)}: {e(t.model)}</h3><p class=\"note\">{e(t.caption)} "
                     f'(<a href="tables/{t.stem}.md">Markdown</a>, <a href="tables/{t.stem}.csv">CSV</a>)</p>')
        parts.append(_html_table(["metric"] + [c.header for c in t.columns], t.cells()))
    parts.append('<p class="note">Every run, every number: <a href="runs.csv">runs.csv</a>; the summary '
                 '<code>dvc metrics show</code> reads: <a href="metrics.json">metrics.json</a>.</p>')
    parts.append('<h2 id="figures">Figures</h2>')
    for src, caption in figures + extra_figures:
        parts.append(f'<figure><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    if notes:
        parts.append("<h3>Skipped</h3><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")

    parts.append('<h2 id="runs">Runs</h2>')
    parts.append(_html_table(
        ["run", "family", "model", "seed", "test acc.", "QWK", "degenerate", "MLflow run id", "MLflow model URI"],
        [[r.spec.name, r.spec.family, r.spec.model, r.spec.seed, _g(r.value("test_accuracy"), ".3f"),
          _g(r.value("test_qwk"), ".3f"), f"{DAGGER} yes" if r.degenerate else "no", _g(r.train.get("mlflow_run_id")),
          _g(r.train.get("mlflow_model_uri"))] for r in runs]))
    bad = [r for r in runs if r.degenerate]
    if bad:
        parts.append("<p>Degenerate models (their explanation metrics are not meaningful):</p><ul>" + "".join(
            f'<li class="deg">{e(r.spec.name)}: '
            f'{e("; ".join((r.explain.get("degeneracy") or {}).get("reasons") or ["collapsed to one class"]))}</li>'
            for r in bad) + "</ul>")
    parts.append('<h2 id="privacy">Privacy accounting</h2><p class="note">ε achieved by the run\'s accountant at δ; '
                 "σ noise multiplier, C clipping bound, q Poisson sample rate; RDP check: ε of the same run recomputed "
                 "by the RDP accountant, as a cross-check.</p>")
    parts.append(_html_table(
        ["run", "scheme", "target ε", "ε achieved", "δ", "σ", "C", "q", "steps", "accountant", "ε (RDP check)"],
        [[r.spec.name, r.spec.scheme, _g(r.train.get("target_epsilon")), _g(r.train.get("epsilon")),
          _g(r.train.get("delta")), _g(r.train.get("noise_multiplier")), _g(r.train.get("max_grad_norm")),
          _g(r.train.get("sample_rate")), _g(r.train.get("steps")), _g(r.train.get("accountant")),
          _g(r.train.get("epsilon_rdp_check"))] for r in runs if r.spec.scheme in ("gaussian", "laplace", "clip-only")]))
    parts.append(_audit_html(runs))
    parts.append('<h2 id="ldp">Local-DP guarantees</h2>')
    seen: dict[str, str] = {}
    for r in runs:
        if r.spec.ldp and r.spec.ldp not in seen:
            g = r.train.get("ldp_guarantee")
            seen[r.spec.ldp] = (g.get("words") if isinstance(g, dict) else None) or json.dumps(g)
    parts.append("<ul>" + "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in seen.items()) + "</ul>"
                 if seen else "<p>No local-DP runs in this grid.</p>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dpcam report: "
            f"{e(grid.name)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _audit_html(runs: list[Run]) -> str:
    """The audit section: one row per audited run; violations listed first, in red."""
    e = html.escape
    head = ('<h2 id="audit">Membership-inference audit</h2><p class="note">From <code>dpcam audit</code> '
            "(audits/&lt;family&gt;/&lt;run&gt;/audit.json): ROC AUC of each attack and the empirical ε lower bound, "
            "all measured on the evaluation half (thresholds chosen on the selection half); the bound holds with 95% "
            "confidence over all attacks together. Check: each attack's conservative (FPR, TPR) point against the "
            "trade-off the run's (ε, δ) allows (and its PLD curve where recorded).</p>")
    audited = [r for r in runs if r.audit]
    if not audited:
        return head + "<p>No run has been audited (run <code>dpcam audit --family F</code>, the audit stage).</p>"
    bad = [r for r in audited if r.audit.get("violation")]
    parts = [head]
    if bad:
        parts.append("<p class=\"deg\">VIOLATION: an attack beats what ε allows (a privacy bug or a broken assumption) "
                     "in: " + e(", ".join(f"{r.spec.name} ({', '.join((r.audit.get('check') or {}).get('violations') or [])})"
                                        for r in bad)) + "</p>")
    cols = [m.key for m in AUDIT_METRICS]
    rows = []
    for r in audited:
        check = r.audit.get("check") or {}
        verdict = ("VIOLATION" if r.audit.get("violation") else f"within ({check.get('bound')})") if check.get("done") \
            else "not checked"
        rows.append([r.spec.name, _g(r.value("epsilon")), r.audit.get("members", "—"), *(_g(r.value(k), ".3f") for k in cols),
                     _g(r.audit.get("epsilon_lb_max_detectable"), ".2f"), verdict])
    parts.append(_html_table(["run", "ε achieved", "members = non-members", *(m.label for m in AUDIT_METRICS),
                              "largest detectable ε", "check"], rows))
    return "".join(parts)


# ------------------------------------------------------------------------------------------ the stage
def report(grid: GridConfig, out: Path = Path("reports"), *, cam_images: int = 4) -> dict[str, Any]:
    """Write the report of ``grid`` under ``out`` (see the module docstring); returns a summary.

    Summary: ``{"out", "index", "runs", "tables", "figures", "skipped"}`` (paths as strings,
    ``runs`` the number of runs, ``skipped`` one line per table/figure left out). Raises
    ``UserError`` (before writing anything) when a run's train.json, explain.json or maps are missing.
    """
    runs = load_runs(grid)
    if not runs:
        raise UserError("params.yaml: the grid section has no runs (grid.models or grid.seeds is empty); list at least one")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        summary = _build(grid, runs, out, tmp, cam_images)
        for name in OWNED:
            _swap_in(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _swap_in(src: Path, dst: Path) -> None:
    from dpcam.data.store import _replace_dir

    if src.is_dir():
        _replace_dir(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _build(grid: GridConfig, runs: list[Run], out: Path, tmp: Path, cam_images: int) -> dict[str, Any]:
    for d in ("tables", "figures", "plots"):
        (tmp / d).mkdir()
    tables, notes = build_tables(runs, grid)
    written_tables = []
    for stem in dict.fromkeys(t.stem for t in tables):
        group = [t for t in tables if t.stem == stem]
        (tmp / "tables" / f"{stem}.md").write_text(table_markdown(group))
        write_csv(tmp / "tables" / f"{stem}.csv", table_records(group))
        written_tables.append(f"tables/{stem}.md")
    write_csv(tmp / "runs.csv", runs_records(runs))
    (tmp / "metrics.json").write_text(json.dumps(summary_metrics(runs), indent=2) + "\n")
    write_csv(tmp / "plots" / "accuracy_vs_eps.csv",
              plot_records(runs, ("test_accuracy", "test_macro_f1", "test_qwk"), ("test_accuracy",)))
    write_csv(tmp / "plots" / "explain_vs_eps.csv",
              plot_records(runs, EXPLAIN_KEYS, ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")))

    models, fig_dir = list(grid.models), tmp / "figures"
    plain = [
        ("fig3_accuracy_vs_eps.png", "Figure 3/7: test accuracy vs ε, Gaussian vs Laplace DP-SGD (dashed: non-private)",
         lambda p: fig_accuracy_vs_eps(tables, models, p)),
        ("fig4_ldp_explanations.png", "Figure 4: Average Drop and Increase in Confidence of models trained on local-DP images",
         lambda p: fig_ldp_explanations(tables, models, p)),
        ("fig6a_masked_accuracy_vs_eps.png", "Figure 6a: masked accuracy vs ε (Gaussian)",
         lambda p: fig_masked_accuracy_vs_eps(tables, models, p)),
        ("fig6b_masked_accuracy_vs_clip.png",
         f"Figure 6b: masked accuracy vs clipping bound C at ε = {format_eps(grid.clip_sweep.epsilon)}",
         lambda p: fig_masked_accuracy_vs_clip(tables, models, grid.clip_sweep.epsilon, p)),
        ("fig_train_size.png", "DP needs more data: accuracy and masked score vs ε per training-set size",
         lambda p: fig_train_size(tables, models, p)),
        ("fig_leakage_vs_eps.png", ("Leakage vs ε: membership-inference AUC and the empirical ε lower bound "
                                    "(95%) against the target ε (y = ε dashed; above it an attack beats the guarantee)"),
         lambda p: fig_leakage_vs_eps(tables, models, p)),
    ]
    figures: list[tuple[str, str]] = []
    for name, caption, draw in plain:
        if draw(fig_dir / name) is not None:
            figures.append((f"figures/{name}", caption))
        elif name == "fig_leakage_vs_eps.png":
            notes.append(f"{name}: skipped, no Gaussian or Laplace run has audits/<family>/<run>/audit.json "
                         "(run `dpcam audit --family F`, the audit stage)")
        else:
            notes.append(f"{name}: skipped, the grid has no runs of its family")
    first = models[0]
    for name, stem, caption in (("fig2_ldp_cams.png", "table3_ldp", "Figure 2: Grad-CAM across local-DP ε"),
                                ("fig5_gaussian_cams.png", "table1_gaussian", "Figure 5: Grad-CAM across ε, Gaussian DP-SGD"),
                                ("fig5_laplace_cams.png", "table2_laplace", "Figure 5 (Laplace): Grad-CAM across ε")):
        t = _by_model(tables, stem).get(first)
        if t is None:
            notes.append(f"{name}: skipped, the grid has no runs of its family")
            continue
        path, why = fig_cams(t.columns, grid.seeds[0], fig_dir / name, f"{caption} ({first})", cam_images)
        if path is not None:
            figures.append((f"figures/{name}", f"{caption} ({first}, seed {grid.seeds[0]}); DEGENERATE marks degenerate models"))
        else:
            notes.append(why)

    if (out / "figures").is_dir():  # figures/ is replaced as a whole: keep pictures other commands put there
        for p in (out / "figures").iterdir():
            if p.is_file() and p.name not in FIGURE_NAMES and not p.name.startswith("."):
                shutil.copy2(p, fig_dir / p.name)
    extra = []
    for ds in sorted({str(r.train.get("dataset")) for r in runs if r.train.get("dataset")}):
        for rel in (f"ldp-{ds}.png", f"figures/ldp-{ds}.png"):  # the ldp-figure stage's picture, where it is
            if (tmp / rel).is_file() or (rel == f"ldp-{ds}.png" and (out / rel).is_file()):
                extra.append((rel, f"Local-DP derivatives of {ds}: clean images and their noised versions per ε"))
                break
    (tmp / "index.html").write_text(render_html(grid, runs, tables, figures, notes, extra,
                                                search=(out / "search" / "index.html").is_file()))
    return {"out": str(out), "index": str(out / "index.html"), "runs": len(runs), "tables": written_tables,
            "figures": [src for src, _ in figures], "skipped": notes}
