"""``reports/search/``: the front (Markdown, CSV, HTML) with test metrics, every trial, Pareto plots, the cost.

The folder is built in a temporary sibling and swapped in whole (:func:`dpcam.layout.staged_dir`).
"""

from __future__ import annotations

import csv
import html
import json
import warnings
from pathlib import Path
from typing import Any

from dpcam import layout
from dpcam.search.front import complete_trials, evaluate_front_member, pareto_front, trial_row
from dpcam.search.objectives import objective_names
from dpcam.search.trial import SearchContext

SETTINGS_COLUMNS = (
    "trial",
    "scheme",
    "model",
    "target_epsilon",
    "clip",
    "lr",
    "epochs",
    "batch_size",
    "noise_multiplier",
)
REPORT_WAIT = 1800.0  # seconds a search waits for another one writing the same report (it may retrain front models)
TEST_COLUMNS = ("test_accuracy", "test_macro_f1", "test_qwk", "test_explain", "test_degenerate", "model_source")


def write_report(
    study, ctx: SearchContext, cost: dict[str, Any], *, evaluate: bool = True, retrain: bool = True
) -> Path:
    """Write ``ctx.cfg.out`` (default reports/search/) atomically: front.md/.csv (with test metrics),
    trials.csv (validation metrics only), cost.json, Pareto plots and index.html.

    ``retrain``: retrain front members whose model is not here (trials of other workers)."""
    names = objective_names(ctx.objective)
    out = Path(ctx.cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time: two searches finishing together each swap in a whole report, one after the other
    with layout.locked(out.with_name(f".{out.name}.lock"), f"{out}/", timeout=REPORT_WAIT, fix="wait for it"):
        with layout.staged_dir(out) as tmp:
            _write(tmp, study, ctx, cost, names, evaluate=evaluate, retrain=retrain)
    return out


def _write(tmp: Path, study, ctx: SearchContext, cost: dict[str, Any], names, *, evaluate: bool, retrain: bool) -> None:
    """The report's files into ``tmp`` (swapped in whole by :func:`write_report`)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    _write_csv(tmp / layout.SEARCH_TRIALS, [trial_row(t, names) for t in trials])
    front = pareto_front(study)
    rows = front_rows(front, ctx, names, evaluate=evaluate, retrain=retrain)
    _write_csv(tmp / layout.SEARCH_FRONT, rows)
    (tmp / layout.SEARCH_COST).write_text(json.dumps(cost, indent=2) + "\n")
    images = _plots(study, names, tmp) if front else []
    cols = [*SETTINGS_COLUMNS, *names, "degenerate", *(TEST_COLUMNS if evaluate else ())]
    done = len(complete_trials(study))
    (tmp / layout.SEARCH_FRONT_MD).write_text(_markdown(ctx, names, rows, cols, cost, len(front), done, len(trials)))
    (tmp / layout.INDEX_HTML).write_text(_html(ctx, rows, cols, images, cost, len(front), done))


def front_rows(
    front: list, ctx: SearchContext, names: list[str], *, evaluate: bool, retrain: bool
) -> list[dict[str, Any]]:
    """The front's table rows, with test metrics (:func:`evaluate_front_member`) when ``evaluate``."""
    rows = []
    for t in front:
        row = trial_row(t, names)
        if evaluate:
            row.update(evaluate_front_member(t, ctx, retrain=retrain))
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["trial"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def _markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(ctx: SearchContext, names: list[str], rows, cols, cost, n_front: int, n_done: int, n_trials: int) -> str:
    """front.md: the front table and the cost-of-tuning statement."""
    md = [
        f"# Pareto front of study `{ctx.study_name}` ({ctx.dataset})",
        "",
        f"{n_front} non-dominated of {n_done} complete trials ({n_trials} in all). Objectives: "
        f"{names[0]} (min), {names[1]} (max, validation), {names[2]} (max, validation; "
        f"`test_explain` is the same on test images). Degenerate models get the worst explanation value.",
        "",
        _markdown_table(rows, cols),
        "",
        "## Cost of tuning",
        "",
        cost["statement"],
        "",
    ]
    return "\n".join(md)


def _html(ctx: SearchContext, rows, cols, images, cost, n_front: int, n_done: int) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    pics = "".join(f'<img src="{p.name}" alt="{p.stem}" style="max-width:48%">' for p in images)
    return (
        f"<!doctype html><meta charset='utf-8'><title>dpcam search: {html.escape(ctx.study_name)}</title>"
        f"<h1>Pareto front of {html.escape(ctx.study_name)} ({html.escape(ctx.dataset)})</h1>"
        f"<p>{n_front} non-dominated of {n_done} complete trials. Files: <a href='front.csv'>front.csv</a>, "
        f"<a href='trials.csv'>trials.csv</a>, <a href='cost.json'>cost.json</a>.</p>"
        f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{body}</table>{pics}"
        f"<h2>Cost of tuning</h2><p>{html.escape(cost['statement'])}</p>"
    )


def _plots(study, names: list[str], out: Path) -> list[Path]:
    """Optuna's Pareto-front plots (the 3-D front highlighted): one 3-D scatter and three 2-D projections."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization.matplotlib import plot_pareto_front

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=names)
        paths.append(_save(ax, out / "pareto_3d.png", (7, 6)))
        for i, j in ((0, 1), (0, 2), (1, 2)):
            ax = plot_pareto_front(
                study, target_names=[names[i], names[j]], targets=lambda t, i=i, j=j: (t.values[i], t.values[j])
            )
            ax.set_title(f"{names[j]} vs {names[i]} (3-D front highlighted)")
            paths.append(_save(ax, out / f"pareto_{i}{j}.png", (6, 4.5)))
    return paths


def _save(ax, path: Path, size: tuple[float, float]) -> Path:
    """Save a plot's figure at ``size`` inches, 100 dpi, and close it."""
    import matplotlib.pyplot as plt

    ax.figure.set_size_inches(*size)
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    return path
