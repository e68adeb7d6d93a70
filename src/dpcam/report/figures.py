"""The report's figures (``figures/*.png``): the paper's Figures 2-7 equivalents and the leakage figure.

Every ``fig_*`` function draws from the tables (:mod:`dpcam.report.tables`) and returns the path it
wrote, or None when the grid has no runs for it; :func:`draw_figures` draws them all with captions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dpcam import guard, layout
from dpcam.config import GridConfig
from dpcam.errors import UserError
from dpcam.families import Column
from dpcam.layout import EXPLAIN_JSON, format_eps
from dpcam.report.plotting import colors, figure, finish, inf_column, inf_line, log_x, series
from dpcam.report.runs import Run
from dpcam.report.tables import Table, by_model

# the report's pictures in figures/ (other files found there are kept)
FIGURE_NAMES = frozenset(
    {
        layout.FIG_LDP_CAMS,
        layout.FIG_ACCURACY,
        layout.FIG_LDP_EXPLANATIONS,
        layout.FIG_GAUSSIAN_CAMS,
        layout.FIG_LAPLACE_CAMS,
        layout.FIG_MASKED_EPS,
        layout.FIG_MASKED_CLIP,
        layout.FIG_TRAIN_SIZE,
        layout.FIG_LEAKAGE,
        layout.FIG_VERDICT,
        layout.FIG_COST_SPLIT,
        layout.FIG_CALIBRATION,
        layout.FIG_METHODS,
    }
)
# (file, family, caption) of the Grad-CAM grids, drawn for the first model of the grid
CAM_FIGURES = (
    (layout.FIG_LDP_CAMS, "ldp", "Figure 2: Grad-CAM across local-DP ε"),
    (layout.FIG_GAUSSIAN_CAMS, "gaussian", "Figure 5: Grad-CAM across ε, Gaussian DP-SGD"),
    (layout.FIG_LAPLACE_CAMS, "laplace", "Figure 5 (Laplace): Grad-CAM across ε"),
)


# ------------------------------------------------------------------------------------ line figures
def fig_accuracy_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 3/7: test accuracy vs ε, Gaussian (solid) vs Laplace (dashed-dotted), ∞ dashed."""
    g, la = by_model(tables, "gaussian"), by_model(tables, "laplace")
    if not g and not la:
        return None
    fig, axes = figure()
    ax, xs, deg = axes[0, 0], [], False
    palette = colors(2 * len(models))  # one colour per (model, scheme)
    for i, model in enumerate(models):
        color = palette[2 * i]
        for t, name, marker, ls, c2 in (
            (g.get(model), "Gaussian", "o", "-", palette[2 * i]),
            (la.get(model), "Laplace", "s", "-.", palette[2 * i + 1]),
        ):
            if t:
                xs += series(
                    ax, [c for c in t.columns if c.group != "none"], "test_accuracy", f"{model} {name}", c2, marker, ls
                )
                deg |= any(c.degenerate for c in t.columns)
        if (t := g.get(model) or la.get(model)) is not None:
            inf_line(ax, inf_column(t.columns), "test_accuracy", f"{model} non-private (ε = ∞)", color)
    log_x(ax, xs, "target ε (log scale)")
    ax.set_ylabel("test accuracy")
    return finish(fig, axes, path, "Test accuracy vs ε: Gaussian vs Laplace DP-SGD", deg)


def fig_ldp_explanations(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 4: Average Drop and Increase in Confidence vs the data's ε,
    one line per mechanism, a panel per model."""
    ldp = by_model(tables, "ldp")
    if not ldp:
        return None
    shown = [m for m in models if m in ldp]
    fig, axes = figure(2, len(shown), 5.0, 3.6)
    deg = False
    for j, model in enumerate(shown):
        t = ldp[model]
        groups = list(dict.fromkeys(c.group for c in t.columns if c.group != "none"))
        for i, (key, label) in enumerate(
            (
                ("avg_drop_pct", "Average Drop % (lower is better)"),
                ("increase_conf_pct", "Increase in Confidence % (higher is better)"),
            )
        ):
            ax, xs = axes[i, j], []
            for grp, color in zip(groups, colors(len(groups))):
                xs += series(ax, [c for c in t.columns if c.group == grp], key, grp, color)
            inf_line(ax, inf_column(t.columns), key, "no LDP (ε = ∞)", "black")
            log_x(ax, xs, "local-DP ε of the training images (log scale)")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=9)
        deg |= any(c.degenerate for c in t.columns)
    return finish(fig, axes, path, "Explanations of models trained on local-DP images", deg)


def fig_masked_accuracy_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Paper Fig. 6a: masked accuracy % vs ε (Gaussian), one line per model, ∞ dashed."""
    g = by_model(tables, "gaussian")
    if not g:
        return None
    fig, axes = figure()
    ax, xs = axes[0, 0], []
    for model, color in zip(models, colors(len(models))):
        if model in g:
            xs += series(ax, [c for c in g[model].columns if c.group != "none"], "masked_accuracy_pct", model, color)
            inf_line(ax, inf_column(g[model].columns), "masked_accuracy_pct", f"{model} non-private (ε = ∞)", color)
    log_x(ax, xs, "target ε (log scale)")
    ax.set_ylabel("masked accuracy % (x ⊙ Grad-CAM classified correctly)")
    return finish(
        fig,
        axes,
        path,
        "Masked accuracy vs ε (Gaussian DP-SGD)",
        any(c.degenerate for t in g.values() for c in t.columns),
    )


def fig_masked_accuracy_vs_clip(tables: list[Table], models: list[str], eps: float, path: Path) -> Path | None:
    """Paper Fig. 6b: masked accuracy % vs the clipping bound C at the sweep's ε."""
    cs = by_model(tables, "clip-sweep")
    if not cs:
        return None
    fig, axes = figure()
    ax, xs = axes[0, 0], []
    for model, color in zip(models, colors(len(models))):
        if model in cs:
            xs += series(ax, cs[model].columns, "masked_accuracy_pct", model, color)
    log_x(ax, xs, "clipping bound C (log scale)")
    ax.set_ylabel("masked accuracy %")
    return finish(
        fig,
        axes,
        path,
        f"Masked accuracy vs clipping bound C at ε = {format_eps(eps)}",
        any(c.degenerate for t in cs.values() for c in t.columns),
    )


def fig_train_size(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Test accuracy and masked score vs ε, one line per training-set size (its non-private value dashed)."""
    ts = by_model(tables, "train-size")
    if not ts:
        return None
    fig, axes = figure(1, 2, 5.2, 4.0)
    deg = False
    markers = "osD^v"
    for k, (key, label) in enumerate((("test_accuracy", "test accuracy"), ("masked_score_pct", "masked score %"))):
        ax, xs = axes[0, k], []
        for mi, model in enumerate(m for m in models if m in ts):
            t = ts[model]
            groups = list(dict.fromkeys(c.group for c in t.columns))
            for grp, color in zip(groups, colors(len(groups))):
                cols = [c for c in t.columns if c.group == grp]
                name = grp if len(ts) == 1 else f"{model} {grp}"
                xs += series(ax, cols, key, name, color, markers[mi % len(markers)])
                inf_line(ax, inf_column(cols), key, f"{name}, ε = ∞", color)
            deg |= any(c.degenerate for c in t.columns)
        log_x(ax, xs, "target ε (log scale)")
        ax.set_ylabel(label)
    return finish(fig, axes, path, "DP needs more data: utility and explanations vs ε per training-set size", deg)


def fig_leakage_vs_eps(tables: list[Table], models: list[str], path: Path) -> Path | None:
    """Membership-inference leakage vs ε (Gaussian solid, Laplace dash-dotted; ε = ∞ dashed).

    Left: the best attack's ROC AUC (``mia_auc``; 0.5 = chance, dotted). Right: the empirical ε lower
    bound (``mia_epsilon_lb``) with the line y = target ε (add/remove) and, as crosses, the replace-one ε
    each run's audit checks against (the audit's members and non-members are a replace-one experiment;
    docs/privacy.md): a point above its cross beats the guarantee. x is the target ε. None when no
    Gaussian/Laplace run has been audited.
    """
    g, la = by_model(tables, "gaussian"), by_model(tables, "laplace")
    audited = [t for t in (*g.values(), *la.values()) if t.audited]
    if not audited:
        return None
    fig, axes = figure(1, 2, 5.2, 4.0)
    palette = colors(2 * len(models))
    for k, (key, label) in enumerate(
        (("mia_auc", "MIA AUC, best attack (0.5 = chance)"), ("mia_epsilon_lb", "empirical ε lower bound (95%)"))
    ):
        ax, xs = axes[0, k], []
        for i, model in enumerate(models):
            for t, name, marker, ls, color in (
                (g.get(model), "Gaussian", "o", "-", palette[2 * i]),
                (la.get(model), "Laplace", "s", "-.", palette[2 * i + 1]),
            ):
                if t:
                    xs += series(
                        ax, [c for c in t.columns if c.group != "none"], key, f"{model} {name}", color, marker, ls
                    )
            if (t := g.get(model) or la.get(model)) is not None:
                inf_line(ax, inf_column(t.columns), key, f"{model} non-private (ε = ∞)", palette[2 * i])
        _leakage_reference(ax, key, xs)
        if key == "mia_epsilon_lb":
            _replace_one_marks(ax, audited)
        log_x(ax, xs, "target ε (log scale)")
        ax.set_ylabel(label)
    return finish(
        fig,
        axes,
        path,
        "Membership-inference leakage vs ε (dpcam audit)",
        any(c.degenerate for t in audited for c in t.columns),
    )


def _replace_one_marks(ax, tables: list[Table]) -> None:
    """The replace-one ε each audited DP column is checked against (mean over its runs), as crosses."""
    pts = []
    for t in tables:
        for c in t.columns:
            eps = [
                r.audit.check.epsilon_replace_one
                for r in c.runs
                if r.audit is not None and r.audit.check.epsilon_replace_one is not None
            ]
            if eps and math.isfinite(c.x):
                pts.append((c.x, float(np.mean(eps))))
    if pts:
        x, y = zip(*sorted(pts))
        ax.plot(x, y, ls="none", marker="x", color="black", label="replace-one ε checked (above: violation)")


def _leakage_reference(ax, key: str, xs: list[float]) -> None:
    """Chance (AUC 0.5, dotted) on the AUC panel; the line y = ε on the ε lower-bound panel."""
    finite = sorted({x for x in xs if math.isfinite(x) and x > 0})
    if key == "mia_auc":
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    elif finite:
        line = np.geomspace(finite[0], finite[-1], 50) if len(finite) > 1 else np.array(finite)
        ax.plot(
            line,
            line,
            color="black",
            ls="--",
            lw=1,
            marker="" if len(finite) > 1 else "x",
            label="y = target ε (add/remove)",
        )
        ax.set_ylim(bottom=0)


# ------------------------------------------------------------------------------------ Grad-CAM grids
def fig_cams(cols: list[Column], seed: int, path: Path, title: str, images: int = 4) -> tuple[Path | None, str | None]:
    """Paper Fig. 2/5: the same test images (rows) across runs of increasing ε (columns, ∞ last).

    Column 0 is the input (from the dataset of the non-LDP run when there is one); each further
    column is the run's own input (LDP runs: its noised image) overlaid with its Grad-CAM map
    (``maps.npy`` float16 (N, H, W), rows matched by ``map_indices.npy``). Uses the runs of ``seed``;
    rows are the first ``images`` test images every column's run scored. Returns (path, None), or
    (None, why) when there is nothing to draw.
    """
    picked = [(c, r) for c in cols for r in c.runs if r.spec.seed == seed]
    if not picked:
        return None, f"{title}: skipped, no runs of seed {seed}"
    loaded = _load_cams(picked)
    common = loaded[0][4]
    for *_, idx in loaded[1:]:
        common = common[np.isin(common, idx)]
    chosen = common[:images]
    if chosen.size == 0:
        return None, f"{title}: skipped, its runs share no scored test image"
    _draw_cams(loaded, chosen, f"{title} (seed {seed})").savefig(path, dpi=110)
    return path, None


def _load_cams(picked: list[tuple[Column, Run]]) -> list[tuple[Column, Run, Any, np.ndarray, np.ndarray]]:
    """(column, run, its dataset, maps, map indices) per picked run; each dataset loaded once."""
    from dpcam.data.store import load_dataset

    datasets: dict[str, Any] = {}
    loaded = []
    for c, r in picked:
        d = r.explain.data_dir
        if not d:
            raise UserError(
                f"grid run {r.spec.name}: {r.spec.metrics_dir / EXPLAIN_JSON} has no data_dir; "
                "rerun `dpcam explain` for it"
            )
        datasets.setdefault(d, load_dataset(d))
        fix, who = "run `dpcam explain` for it again (or `dvc repro`)", f"grid run {r.spec.name}: "
        idx = guard.read_npy(r.spec.metrics_dir / layout.MAP_INDICES, fix=fix, who=who, shape=(None,), dtype=np.integer)
        maps = guard.read_npy(
            r.spec.metrics_dir / layout.MAPS, fix=fix, who=who, mmap=True, shape=(len(idx), None, None)
        )
        loaded.append((c, r, datasets[d], maps, idx))
    return loaded


def _draw_cams(loaded: list, chosen: np.ndarray, title: str):
    """The grid: one row per chosen image, the clean input then each run's overlay."""
    from dpcam.explain.score import overlay

    clean = next((d for _, r, d, *_ in loaded if r.spec.scheme != "ldp"), loaded[0][2])
    fig, axes = figure(len(chosen), len(loaded) + 1, 1.7, 1.7)
    for i, idx in enumerate(chosen):
        axes[i, 0].imshow(np.asarray(clean.images[idx]), interpolation="nearest")
        axes[i, 0].set_ylabel(clean.classes[int(clean.labels[idx])], fontsize=7)
        for j, (c, r, d, maps, midx) in enumerate(loaded, start=1):
            k = int(np.flatnonzero(midx == idx)[0])
            img = np.asarray(d.images[idx], dtype=np.float32) / 255
            axes[i, j].imshow(overlay(img, np.asarray(maps[k], dtype=np.float32)), interpolation="nearest")
            if i == 0:
                label = c.label.replace(" (", "\n(") if " (" in c.label else c.label.replace(" ε", "\nε")
                axes[i, j].set_title(
                    label + ("\nDEGENERATE" if r.degenerate else ""),
                    fontsize=7,
                    color="red" if r.degenerate else "black",
                )
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------------ all of them
def _line_figures(grid: GridConfig, tables: list[Table]) -> list[tuple[str, str, Callable[[Path], Path | None]]]:
    """(file, caption, draw) of the line figures, in page order."""
    models, eps = list(grid.models), grid.clip_sweep.epsilon
    return [
        (
            layout.FIG_ACCURACY,
            "Figure 3/7: test accuracy vs ε, Gaussian vs Laplace DP-SGD (dashed: non-private)",
            lambda p: fig_accuracy_vs_eps(tables, models, p),
        ),
        (
            layout.FIG_LDP_EXPLANATIONS,
            "Figure 4: Average Drop and Increase in Confidence of models trained on local-DP images",
            lambda p: fig_ldp_explanations(tables, models, p),
        ),
        (
            layout.FIG_MASKED_EPS,
            "Figure 6a: masked accuracy vs ε (Gaussian)",
            lambda p: fig_masked_accuracy_vs_eps(tables, models, p),
        ),
        (
            layout.FIG_MASKED_CLIP,
            f"Figure 6b: masked accuracy vs clipping bound C at ε = {format_eps(eps)}",
            lambda p: fig_masked_accuracy_vs_clip(tables, models, eps, p),
        ),
        (
            layout.FIG_TRAIN_SIZE,
            "DP needs more data: accuracy and masked score vs ε per training-set size",
            lambda p: fig_train_size(tables, models, p),
        ),
        (
            layout.FIG_LEAKAGE,
            (
                "Leakage vs ε: membership-inference AUC and the empirical ε lower bound "
                "(95%) against the target ε (y = ε dashed; above it an attack beats the guarantee)"
            ),
            lambda p: fig_leakage_vs_eps(tables, models, p),
        ),
    ]


def draw_figures(
    grid: GridConfig, tables: list[Table], folder: Path, cam_images: int
) -> tuple[list[tuple[str, str]], list[str]]:
    """Every figure into ``folder``: ((src relative to the report, caption) per figure drawn,
    a note per skipped one)."""
    figures: list[tuple[str, str]] = []
    notes: list[str] = []
    for name, caption, draw in _line_figures(grid, tables):
        if draw(folder / name) is not None:
            figures.append((f"figures/{name}", caption))
        elif name == layout.FIG_LEAKAGE:
            notes.append(
                f"{name}: skipped, no Gaussian or Laplace run has audits/<family>/<run>/audit.json "
                "(run `dpcam audit --family F`, the audit stage)"
            )
        else:
            notes.append(f"{name}: skipped, the grid has no runs of its family")
    first, seed = grid.models[0], grid.seeds[0]
    for name, family, caption in CAM_FIGURES:
        t = by_model(tables, family).get(first)
        if t is None:
            notes.append(f"{name}: skipped, the grid has no runs of its family")
            continue
        path, why = fig_cams(t.columns, seed, folder / name, f"{caption} ({first})", cam_images)
        if path is not None:
            figures.append((f"figures/{name}", f"{caption} ({first}, seed {seed}); DEGENERATE marks degenerate models"))
        else:
            notes.append(why)
    return figures, notes
