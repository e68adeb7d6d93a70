"""The report stage: build the whole report in a temporary folder next to ``reports/``, then swap in its entries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dpcam.config import GridConfig, VerdictConfig
from dpcam.errors import UserError
from dpcam.families import pick
from dpcam.layout import (
    FIG_CALIBRATION,
    FIG_COST_SPLIT,
    FIG_METHODS,
    FIG_VERDICT,
    FIGURES_DIR,
    INDEX_HTML,
    METRICS_JSON,
    PLOTS_DIR,
    REPORTS_ROOT,
    RUNS_CSV,
    SEARCH_REPORT,
    TABLES_DIR,
    VERDICT_MD,
    swap_in,
    temp_dir,
    write_text,
)
from dpcam.report.figures import FIGURE_NAMES, draw_figures
from dpcam.report.flat import write_flat_files
from dpcam.report.methods import by_method
from dpcam.report.page import render_html
from dpcam.report.runs import Run, load_runs
from dpcam.report.tables import build_tables, write_tables
from dpcam.report.verdict import dvc_metrics, summary, verdict
from dpcam.report.verdict_figures import fig_calibration, fig_cost_split, fig_forest, fig_methods
from dpcam.report.verdict_text import description, html_section, markdown

# the report's own entries under out/: only these are replaced
OWNED = (INDEX_HTML, VERDICT_MD, TABLES_DIR, FIGURES_DIR, PLOTS_DIR, RUNS_CSV, METRICS_JSON)
FOLDERS = (TABLES_DIR, FIGURES_DIR, PLOTS_DIR)


def report(
    grid: GridConfig, out: Path = REPORTS_ROOT, *, cam_images: int = 4, verdict: VerdictConfig | None = None
) -> dict[str, Any]:
    """Write the report of ``grid`` under ``out`` (see :mod:`dpcam.report`); returns a summary.

    Summary: ``{"out", "index", "runs", "tables", "figures", "skipped", "mlflow"}`` (paths as strings,
    ``runs`` the number of runs, ``skipped`` one line per table/figure left out). Raises
    ``UserError`` (before writing anything) when a run's train.json, explain.json or maps are missing.
    """
    runs = load_runs(grid)
    if not runs:
        raise UserError(
            "params.yaml: the grid section has no runs (grid.models or grid.seeds is empty); list at least one"
        )
    from dpcam import tracking

    tracking.open_store()  # a store fault stops the report before reports/ is touched
    out = Path(out)
    tmp = temp_dir(out)
    try:
        summary = _build(grid, runs, out, tmp, cam_images, verdict or VerdictConfig())
        for name in OWNED:
            swap_in(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_verdict(summary.pop("verdicts"), summary.pop("methods"), runs, grid, out)
    summary["mlflow"] = tracking.runs_page(runs[0].train.dataset)
    return summary


def _log_verdict(verdicts, methods: dict, runs: list[Run], grid: GridConfig, out: Path) -> None:
    """The verdict as one MLflow run of the grid (``verdict-<grid>``, tagged ``dpcam.grid``), beside its runs;
    the same run is updated when the report is made again. Its description (the UI renders it) is the answer
    and the claims; its artifacts verdict.md and the forest plot."""
    from dpcam import tracking

    dataset = runs[0].train.dataset
    tags = {"dpcam.grid": grid.name, "dpcam.kind": "verdict"}
    with tracking.parent_run(dataset, f"verdict-{grid.name}", f"verdict:{dataset}:{grid.name}", tags=tags):
        for v in verdicts:
            numbers = summary(v)
            tracking.log_metrics({f"{v.model}.{k}": x for k, x in numbers.items() if k != "claims"})
            tracking.set_tags({f"dpcam.claim.{v.model}.{c.key}": c.verdict for c in v.claims})
        tracking.set_tags({"mlflow.note.content": description(verdicts, runs, grid, methods)})
        tracking.log_artifact(out / VERDICT_MD)
        for v in verdicts:
            for name in (FIG_VERDICT, FIG_METHODS):
                if (picture := out / FIGURES_DIR / _model_file(name, v, verdicts)).is_file():
                    tracking.log_artifact(picture)


def _verdict_figures(verdicts, runs: list[Run], folder: Path, figures: list[tuple[str, str]]) -> dict[str, str]:
    """Each verdict's pictures into ``folder`` (the first model's under the layout's names, the others' beside
    them): the forest plot (returned, model -> src, for the top of its section), the cost split (first among
    ``figures``) and the calibration diagram (last)."""
    pictures = {}
    for v in verdicts:
        name = _model_file(FIG_VERDICT, v, verdicts)
        if fig_forest(v, folder / name) is not None:
            pictures[v.model] = f"{FIGURES_DIR}/{name}"
        name = _model_file(FIG_COST_SPLIT, v, verdicts)
        if fig_cost_split(v, folder / name) is not None:
            what = f"What privacy costs ({v.model}): ε − ∞ split into the DP budget, clipping and noise, per ε"
            figures.insert(0, (f"{FIGURES_DIR}/{name}", what + " (verdict.md has every metric)"))
        name = _model_file(FIG_CALIBRATION, v, verdicts)
        reference = pick(runs, family="baseline", scheme="none", model=v.model, schedule=None)
        if fig_calibration(v, reference, folder / name) is not None:
            what = f"Calibration ({v.model}): the reliability diagram of each ε against ε = ∞"
            figures.append((f"{FIGURES_DIR}/{name}", what))
    return pictures


def _method_figures(verdicts, methods: dict, config: VerdictConfig, folder: Path) -> dict[str, str]:
    """Each model's verdict per explanation method as a picture (model -> src); none with one method."""
    pictures = {}
    for v in verdicts:
        name = _model_file(FIG_METHODS, v, verdicts)
        if methods.get(v.model) is not None and fig_methods(methods[v.model], config.margins, folder / name):
            pictures[v.model] = f"{FIGURES_DIR}/{name}"
    return pictures


def _model_file(name: str, v, verdicts) -> str:
    """A verdict figure's file: ``name`` for the first model, ``<stem>_<model>.png`` for the others."""
    return name if v is verdicts[0] else name.replace(".png", f"_{v.model}.png")


def _build(
    grid: GridConfig, runs: list[Run], out: Path, tmp: Path, cam_images: int, config: VerdictConfig
) -> dict[str, Any]:
    """Every entry of the report into ``tmp`` (``out``: the report being replaced, for what it keeps)."""
    for d in FOLDERS:
        (tmp / d).mkdir()
    tables, notes = build_tables(runs, grid)
    written_tables = write_tables(tables, tmp / TABLES_DIR)
    verdicts = [verdict(runs, grid, model, config) for model in grid.models]
    notes += [f"verdict ({v.model}): {p}" for v in verdicts for p in v.problems()]
    methods = {v.model: by_method(runs, grid, v.model, config) for v in verdicts}
    pictures = _method_figures(verdicts, methods, config, tmp / FIGURES_DIR)
    write_text(tmp / VERDICT_MD, markdown(verdicts, runs, grid, methods, pictures))
    write_flat_files(runs, grid, tmp, dvc_metrics(verdicts[0]))  # the first model's: the grid's headline
    figures, skipped = draw_figures(grid, tables, tmp / FIGURES_DIR, cam_images)
    notes += skipped
    forests = _verdict_figures(verdicts, runs, tmp / FIGURES_DIR, figures)
    _keep_other_figures(out / FIGURES_DIR, tmp / FIGURES_DIR)
    page = render_html(
        grid,
        runs,
        tables,
        figures,
        notes,
        _ldp_pictures(runs, out, tmp),
        search=(out / SEARCH_REPORT.name / INDEX_HTML).is_file(),
        verdict=html_section(verdicts, runs, grid, forests, methods, pictures),
    )
    write_text(tmp / INDEX_HTML, page)
    return {
        "out": str(out),
        "index": str(out / INDEX_HTML),
        "verdicts": verdicts,
        "methods": methods,
        "runs": len(runs),
        "tables": written_tables,
        "figures": [src for src, _ in figures],
        "skipped": notes,
    }


def _keep_other_figures(old: Path, new: Path) -> None:
    """figures/ is replaced as a whole: copy the pictures other commands put there (e.g. `dpcam figure cams`)."""
    if not old.is_dir():
        return
    for p in old.iterdir():
        if p.is_file() and p.name not in FIGURE_NAMES and not p.name.startswith("."):
            shutil.copy2(p, new / p.name)


def _ldp_pictures(runs: list[Run], out: Path, tmp: Path) -> list[tuple[str, str]]:
    """(src, caption) of the ldp-figure stage's picture of each dataset, where it is (out/ or figures/)."""
    extra = []
    for ds in sorted({r.train.dataset for r in runs if r.train.dataset}):
        for rel in (f"ldp-{ds}.png", f"figures/ldp-{ds}.png"):
            if (tmp / rel).is_file() or (rel == f"ldp-{ds}.png" and (out / rel).is_file()):
                extra.append((rel, f"Local-DP derivatives of {ds}: clean images and their noised versions per ε"))
                break
    return extra
