"""The report's page, ``index.html``: every table and figure, the runs with their MLflow ids, privacy
accounting, the membership-inference audit and local-DP guarantees. Inline CSS, no scripts, opens offline.

The page points to the definitions in the dpcam repository: ``docs/metrics.md`` (every metric) and
``docs/privacy.md`` (the privacy accounting and the audit's check).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from dpcam.config import GridConfig
from dpcam.layout import INDEX_HTML, METRICS_JSON, RUNS_CSV, SEARCH_REPORT
from dpcam.names import CLIPPED_SCHEMES
from dpcam.report.rows import AUDIT_ROWS, DAGGER, DEGENERATE_NOTE, header
from dpcam.report.runs import Run
from dpcam.report.tables import Table

e = html.escape
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;\
margin:2em auto;padding:0 1em;color:#1d232a}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:12.5px}\
th,td{border:1px solid #d5d9e0;padding:3px 7px;text-align:right}
th{background:#f1f3f6}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafbfc}
.wide{overflow-x:auto}.note{color:#555;font-size:12.5px}.deg{color:#b00020;font-weight:600}
figure{margin:1em 0}img{max-width:100%;border:1px solid #e3e6ea}figcaption{color:#555;font-size:12.5px}
code{background:#f3f4f6;padding:0 3px}nav a{margin-right:1em}
"""
METRICS_DOC, PRIVACY_DOC = "docs/metrics.md", "docs/privacy.md"  # in the dpcam repository (not under reports/)


def html_table(header_row: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{e(str(h))}</th>" for h in header_row)
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _g(v: Any, fmt: str = ".4g") -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def render_html(
    grid: GridConfig,
    runs: list[Run],
    tables: list[Table],
    figures: list[tuple[str, str]],
    notes: list[str],
    extra_figures: list[tuple[str, str]],
    search: bool = False,
    verdict: str = "",
) -> str:
    """The index page: ``figures`` and ``extra_figures`` are (relative src, caption) pairs.

    ``search``: link ``search/index.html`` (what ``dpcam search`` writes next to the report);
    ``verdict``: the verdict's HTML section, which opens the page.
    """
    parts = [
        *_intro(grid, runs, search),
        verdict,
        *_tables_section(tables),
        *_figures_section(figures + extra_figures, notes),
        *_runs_section(runs),
        *_privacy_section(runs),
        _audit_section(runs),
        *_ldp_section(runs),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>dpcam report: '
        f"{e(grid.name)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _intro(grid: GridConfig, runs: list[Run], search: bool) -> list[str]:
    """Heading, what the page shows and how to read a cell, the degenerate mark, the navigation."""
    datasets = sorted({r.train.dataset for r in runs})
    return [
        f"<h1>dpcam report: grid <code>{e(grid.name)}</code></h1>",
        (
            "<p>How much interpretability does differential privacy cost? The equivalents of the tables and figures of "
            "Naidu et al. (2021), <i>When Differential Privacy Meets Interpretability</i>, computed on "
            f"<b>{e(', '.join(datasets))}</b> for models <b>{e(', '.join(grid.models))}</b> and seeds "
            f"<b>{e(', '.join(map(str, sorted({r.spec.seed for r in runs}))))}</b> ({len(runs)} runs). "
            "Cells are the mean over seeds "
            "± the half-width of its 95% confidence interval (Student t, t<sub>0.975,n−1</sub>·s/√n; no ± with one "
            f"seed); ε = ∞ is the non-private run. Definitions of every metric: <code>{METRICS_DOC}</code>, of the "
            f"privacy accounting and the audit: <code>{PRIVACY_DOC}</code> (in the dpcam repository).</p>"
        ),
        f'<p class="note">{e(DEGENERATE_NOTE)}</p>',
        (
            '<nav><a href="#tables">Tables</a><a href="#figures">Figures</a><a href="#runs">Runs</a>'
            '<a href="#privacy">Privacy accounting</a><a href="#audit">Membership-inference audit</a>'
            '<a href="#ldp">Local-DP guarantees</a>'
            + (f'<a href="{SEARCH_REPORT.name}/{INDEX_HTML}">Search: Pareto front</a>' if search else "")
            + "</nav>"
        ),
    ]


def _tables_section(tables: list[Table]) -> list[str]:
    parts = ['<h2 id="tables">Tables</h2>']
    for t in tables:
        parts.append(
            f'<h3>{e(t.title)}: {e(t.model)}</h3><p class="note">{e(t.caption)} '
            f'(<a href="tables/{t.stem}.md">Markdown</a>, <a href="tables/{t.stem}.csv">CSV</a>)</p>'
        )
        parts.append(html_table(["metric"] + [header(c) for c in t.columns], t.cells()))
    parts.append(
        f'<p class="note">Every run, every number: <a href="{RUNS_CSV}">{RUNS_CSV}</a>; the summary '
        f'<code>dvc metrics show</code> reads: <a href="{METRICS_JSON}">{METRICS_JSON}</a>.</p>'
    )
    return parts


def _figures_section(figures: list[tuple[str, str]], notes: list[str]) -> list[str]:
    parts = ['<h2 id="figures">Figures</h2>']
    for src, caption in figures:
        parts.append(f'<figure><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    if notes:
        parts.append("<h3>Skipped</h3><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    return parts


def _runs_section(runs: list[Run]) -> list[str]:
    """Every run with its MLflow ids; the degenerate ones listed with why."""
    parts = [
        '<h2 id="runs">Runs</h2>',
        html_table(
            ["run", "family", "model", "seed", "test acc.", "QWK", "degenerate", "MLflow run id", "MLflow model URI"],
            [
                [
                    r.spec.name,
                    r.spec.family,
                    r.spec.model,
                    r.spec.seed,
                    _g(r.value("test_accuracy"), ".3f"),
                    _g(r.value("test_qwk"), ".3f"),
                    f"{DAGGER} yes" if r.degenerate else "no",
                    _g(r.train.mlflow_run_id),
                    _g(r.train.mlflow_model_uri),
                ]
                for r in runs
            ],
        ),
    ]
    bad = [r for r in runs if r.degenerate]
    if bad:
        parts.append(
            "<p>Degenerate models (their explanation metrics are not meaningful):</p><ul>"
            + "".join(
                f'<li class="deg">{e(r.spec.name)}: '
                f"{e('; '.join(r.explain.degeneracy.reasons or ['collapsed to one class']))}</li>"
                for r in bad
            )
            + "</ul>"
        )
    return parts


def _privacy_section(runs: list[Run]) -> list[str]:
    """The accounting of every clipped (DP-SGD or clip-only) run, from its train record."""
    note = (
        '<h2 id="privacy">Privacy accounting</h2><p class="note">ε achieved by the run\'s accountant at δ; '
        "σ noise multiplier, C clipping bound, q Poisson sample rate; RDP check: ε of the same run recomputed "
        f"by the RDP accountant, as a cross-check. How each is computed: <code>{PRIVACY_DOC}</code>.</p>"
    )
    rows = [_privacy_row(r) for r in runs if r.spec.scheme in CLIPPED_SCHEMES]
    return [
        note,
        html_table(
            ["run", "scheme", "target ε", "ε achieved", "δ", "σ", "C", "q", "steps", "accountant", "ε (RDP check)"],
            rows,
        ),
    ]


def _privacy_row(r: Run) -> list[Any]:
    t = r.train
    return [
        r.spec.name,
        r.spec.scheme,
        _g(t.target_epsilon),
        _g(t.epsilon),
        _g(t.delta),
        _g(t.noise_multiplier),
        _g(t.max_grad_norm),
        _g(t.sample_rate),
        _g(t.steps),
        _g(t.accountant),
        _g(t.epsilon_rdp_check),
    ]


def _audit_section(runs: list[Run]) -> str:
    """The audit section: one row per audited run; violations listed first, in red."""
    head = (
        '<h2 id="audit">Membership-inference audit</h2><p class="note">From <code>dpcam audit</code> '
        "(audits/&lt;family&gt;/&lt;run&gt;/audit.json): ROC AUC of each attack and the empirical ε lower bound, "
        "all measured on the evaluation half (thresholds chosen on the selection half); the bound holds with 95% "
        "confidence over all attacks together. Check: each attack's conservative (FPR, TPR) point against the "
        "trade-off a replace-one neighbour allows (members and non-members are different images of one model: a "
        "replace-one experiment), from the run's σ or λ, q and steps (docs/privacy.md).</p>"
    )
    audited = [r for r in runs if r.audit is not None]
    if not audited:
        return head + "<p>No run has been audited (run <code>dpcam audit --family F</code>, the audit stage).</p>"
    parts = [head]
    bad = [r for r in audited if r.audit.violation]
    if bad:
        parts.append(
            '<p class="deg">VIOLATION: an attack beats what ε allows (a privacy bug or a broken assumption) '
            "in: " + e(", ".join(f"{r.spec.name} ({', '.join(r.audit.check.violations or [])})" for r in bad)) + "</p>"
        )
    parts.append(
        html_table(
            [
                "run",
                "ε achieved (add/remove)",
                "ε checked (replace-one)",
                "members = non-members",
                *(m.label for m in AUDIT_ROWS),
                "largest detectable ε",
                "check",
            ],
            [_audit_row(r) for r in audited],
        )
    )
    return "".join(parts)


def _audit_row(r: Run) -> list[Any]:
    check = r.audit.check
    verdict = ("VIOLATION" if r.audit.violation else f"within ({check.bound})") if check.done else "not checked"
    return [
        r.spec.name,
        _g(r.value("epsilon")),
        _g(check.epsilon_replace_one),
        r.audit.members,
        *(_g(r.value(m.key), ".3f") for m in AUDIT_ROWS),
        _g(r.audit.epsilon_lb_max_detectable, ".2f"),
        verdict,
    ]


def _ldp_section(runs: list[Run]) -> list[str]:
    """The guarantee of each local-DP derivative a run trained on, in words (its JSON when it has none)."""
    seen: dict[str, str] = {}
    for r in runs:
        if r.spec.ldp and r.spec.ldp not in seen:
            g = r.train.ldp_guarantee
            seen[r.spec.ldp] = (g.get("words") if isinstance(g, dict) else None) or json.dumps(g)
    return [
        '<h2 id="ldp">Local-DP guarantees</h2>',
        "<ul>" + "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in seen.items()) + "</ul>"
        if seen
        else "<p>No local-DP runs in this grid.</p>",
    ]
