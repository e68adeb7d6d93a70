"""The report's tables: one per run family (:data:`dpcam.families.FAMILIES`) and model, as Markdown and
long-form CSV under ``tables/``.

A family's table (file stem, title, columns) is its definition in the registry; tables are laid out
in the order of their stems (table1_gaussian ... table6_baselines). Each cell is the mean over seeds
± the 95% Student-t half-width (:mod:`dpcam.report.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpcam.config import GridConfig
from dpcam.families import FAMILIES, Column, Family, pick
from dpcam.layout import format_eps, write_text
from dpcam.report.flat import num, write_csv
from dpcam.report.rows import AUDIT_ROWS, DEGENERATE_NOTE, ROWS, UNDERTRAINED_NOTE, Row, header
from dpcam.report.runs import Run
from dpcam.report.stats import format_cell, mean_ci


@dataclass
class Table:
    family: str  # the run family it tabulates
    stem: str  # file stem under tables/
    title: str
    model: str
    columns: list[Column]
    caption: str = ""

    @property
    def audited(self) -> bool:
        """Whether some run of the table has audit.json."""
        return any(r.audit is not None for c in self.columns for r in c.runs)

    @property
    def rows(self) -> tuple[Row, ...]:
        """The table's rows: ``ROWS``, plus ``AUDIT_ROWS`` when some run of the table has been audited."""
        return ROWS + AUDIT_ROWS if self.audited else ROWS

    def cells(self) -> list[list[str]]:
        """Rows of formatted cells: the row label, then one cell per column."""
        return [[m.label] + [format_cell(c.values(m.key), m.decimals) for c in self.columns] for m in self.rows]


def table_families() -> list[Family]:
    """The families in the order of their tables (by file stem: the page order)."""
    return sorted(FAMILIES.values(), key=lambda f: f.table)


def build_tables(runs: list[Run], grid: GridConfig) -> tuple[list[Table], list[str]]:
    """The report's tables (one per family and model, families without runs left out) and a note per skipped one."""
    tables: list[Table] = []
    notes: list[str] = []
    for family in table_families():
        made = [t for model in grid.models if (t := _table(family, model, runs, grid)) is not None]
        if not made:
            notes.append(f"{family.title}: skipped, the grid has no {family.name} runs")
        tables += made
    return tables, notes


def _table(family: Family, model: str, runs: list[Run], grid: GridConfig) -> Table | None:
    """``family``'s table for ``model`` (None when it has no runs of that model)."""
    mine = pick(runs, family=family.name, model=model)
    if not mine:
        return None
    cols = [c for c in family.columns(mine, pick(runs, model=model), grid) if c.runs]
    return Table(family.name, family.table, family.title, model, cols, _caption(family, cols, grid))


def _caption(family: Family, cols: list[Column], grid: GridConfig) -> str:
    seeds = sorted({r.spec.seed for c in cols for r in c.runs})
    caption = (
        f"mean ± 95% CI (Student t) over the n seeds of each column (seeds {', '.join(map(str, seeds))}); "
        "a column with n = 1 shows its one value, without an interval"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): no confidence interval"
    )
    if family.name == "clip-sweep":
        caption += f"; all runs at ε = {format_eps(grid.clip_sweep.epsilon)}"
    return caption


def table_markdown(tables: list[Table]) -> str:
    """One Markdown document for the tables of one family (a section per model)."""
    out = [f"# {tables[0].title}", ""]
    for t in tables:
        out += [
            f"## {t.model}",
            "",
            f"_{t.caption}_",
            "",
            "| metric | " + " | ".join(header(c) for c in t.columns) + " |",
            "|---|" + "---:|" * len(t.columns),
        ]
        out += ["| " + " | ".join(row) + " |" for row in t.cells()]
        out.append("")
    if any(c.degenerate for t in tables for c in t.columns):
        out += [DEGENERATE_NOTE, ""]
    if any(r.undertrained for t in tables for c in t.columns for r in c.runs):
        out += [UNDERTRAINED_NOTE, ""]
    return "\n".join(out)


def table_records(tables: list[Table]) -> list[dict[str, Any]]:
    """Long-form rows of the tables of one family: model, column, x, metric, mean, ci95 (n ≥ 2), n, degenerate."""
    rows = []
    for t in tables:
        for c in t.columns:
            for m in t.rows:
                vals = c.values(m.key)
                mean, half = mean_ci(vals)
                rows.append(
                    {
                        "model": t.model,
                        "column": c.label,
                        "group": c.group,
                        "x": num(c.x),
                        "metric": m.key,
                        "mean": num(mean),
                        "ci95": num(half),
                        "n": len(vals),
                        "seeds": len(c.runs),
                        "degenerate_runs": sum(r.degenerate for r in c.runs),
                        "runs": " ".join(r.spec.name for r in c.runs),
                    }
                )
    return rows


def write_tables(tables: list[Table], folder: Path) -> list[str]:
    """``<stem>.md`` and ``<stem>.csv`` per family under ``folder``;
    returns the Markdown files as ``tables/<stem>.md``."""
    written = []
    for stem in dict.fromkeys(t.stem for t in tables):
        group = [t for t in tables if t.stem == stem]
        write_text(folder / f"{stem}.md", table_markdown(group))
        write_csv(folder / f"{stem}.csv", table_records(group))
        written.append(f"tables/{stem}.md")
    return written


def by_model(tables: list[Table], family: str) -> dict[str, Table]:
    """``family``'s tables by model."""
    return {t.model: t for t in tables if t.family == family}
