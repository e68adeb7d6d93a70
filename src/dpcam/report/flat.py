"""The report's flat files: runs.csv (every number of every run), metrics.json (``dvc metrics``) and
plots/*.csv (``dvc plots``), and the CSV writer the tables share."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dpcam.config import GridConfig
from dpcam.families import train_overrides
from dpcam.layout import METRICS_JSON, PLOT_ACCURACY, PLOT_EXPLAIN, PLOTS_DIR, RUNS_CSV, write_atomic, write_json
from dpcam.records import Record
from dpcam.report.runs import Run

INF = math.inf
EXPLAIN_KEYS = (
    "avg_drop_pct",
    "increase_conf_pct",
    "masked_score_pct",
    "masked_accuracy_pct",
    "pointing_game",
    "energy_pointing_game",
    "map_agreement",
    "deletion_auc",
    "insertion_auc",
    "randomisation_agreement",
)
ACCURACY_KEYS = ("test_accuracy", "test_macro_f1", "test_qwk")
SCHEMA_KEY = "schema"  # a record's format version: not a number of the run, left out of runs.csv


def num(v: float | None, missing: str = "") -> Any:
    """A number as a CSV cell: ``missing`` for None / NaN, ``inf`` for ∞."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return "inf" if v == INF else v


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """CSV with the union of the rows' keys as header (first-seen order); missing cells empty; atomic."""
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)

    return write_atomic(path, write)


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


def _numbers(record: Record | None) -> Iterable[tuple[str, float]]:
    """The numbers of a record's JSON form (what its file holds), its format version left out."""
    if record is None:
        return ()
    return _flatten({k: v for k, v in record.to_json().items() if k != SCHEMA_KEY})


def runs_records(runs: list[Run], grid: GridConfig) -> list[dict[str, Any]]:
    """runs.csv rows: identity of the run, then every numeric key of train.json, then of explain.json
    (a key both have is prefixed ``explain.`` on the explain side), then of audit.json (all prefixed ``audit.``).

    ``grid_clip`` is the clipping bound the grid sets for the run (a clip-sweep run's C, the laplace runs'
    ``grid.laplace_clip``), blank where the run keeps ``train.clip``.
    """
    rows = []
    for r in runs:
        s = r.spec
        clip = train_overrides(s, grid).get("clip")
        row: dict[str, Any] = {
            "run": s.name,
            "family": s.family,
            "scheme": s.scheme,
            "model": s.model,
            "seed": s.seed,
            "ldp": s.ldp or "",
            "grid_epsilon": num(s.epsilon),
            "grid_clip": num(clip),
            "grid_train_size": num(s.train_size),
            "degenerate": int(r.degenerate),
        }
        row.update(_numbers(r.train))
        for k, v in _numbers(r.explain):
            row[f"explain.{k}" if k in row else k] = v
        row.update({f"audit.{k}": v for k, v in _numbers(r.audit)})
        rows.append(row)
    return rows


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
        row = {
            "scheme": r.spec.scheme,
            "epsilon": num(INF if r.spec.epsilon is None else r.spec.epsilon),
            "model": r.spec.model,
            "seed": r.spec.seed,
            "run": r.spec.name,
            "epsilon_achieved": num(r.value("epsilon"), "NaN"),
            "degenerate": int(r.degenerate),
        }
        row.update({k: num(r.value(k), "NaN") for k in keys})
        for scheme in ("gaussian", "laplace"):
            row.update({f"{scheme}_{k}": row[k] if r.spec.scheme == scheme else "NaN" for k in split})
        rows.append(row)
    return sorted(rows, key=lambda d: (d["scheme"], float(d["epsilon"]), d["model"], d["seed"]))


def write_flat_files(runs: list[Run], grid: GridConfig, folder: Path, metrics: dict[str, Any]) -> None:
    """runs.csv (every number of every run), metrics.json (``metrics``: the verdict's few numbers,
    :func:`dpcam.report.verdict.dvc_metrics`) and plots/{accuracy,explain}_vs_eps.csv under ``folder``."""
    write_csv(folder / RUNS_CSV, runs_records(runs, grid))
    write_json(folder / METRICS_JSON, metrics)
    write_csv(folder / PLOTS_DIR / PLOT_ACCURACY, plot_records(runs, ACCURACY_KEYS, ("test_accuracy",)))
    write_csv(
        folder / PLOTS_DIR / PLOT_EXPLAIN,
        plot_records(runs, EXPLAIN_KEYS, ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")),
    )
