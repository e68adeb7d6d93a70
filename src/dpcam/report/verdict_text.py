"""The verdict in words: ``reports/verdict.md`` and the section that opens ``reports/index.html``."""

from __future__ import annotations

import html
from collections.abc import Sequence

from dpcam.config import GridConfig
from dpcam.layout import format_eps
from dpcam.report.paired import Difference
from dpcam.report.runs import Run
from dpcam.report.verdict import (
    ACCURACY,
    AGREEMENT,
    CONFIDENCE_KEY,
    EXPLANATION,
    PAPER,
    QWK,
    RANDOMISATION,
    ROAD_GAP,
    SENSITIVITY_KEY,
    Verdict,
    _label,
)

MEASURES = (ACCURACY, QWK, *EXPLANATION, ROAD_GAP, AGREEMENT, RANDOMISATION)
MATCHED = tuple(_label(f"{k}|{match}") for match in (CONFIDENCE_KEY, SENSITIVITY_KEY) for k in PAPER)
WORSE, BETTER = "▼", "▲"
MATCHED_NOTE = (
    "The paper's metrics on matched images (the same paired differences, on the images where the private and the "
    "non-private model of a seed are equally confident, |ΔY| ≤ 0.05, or equally sensitive to masking with a uniform "
    'map of the same mass, |ΔS| ≤ 5 points; docs/metrics.md, "What confounds the paper\'s metrics"):'
)


def _eps(e: float | None) -> str:
    return "none" if e is None else f"ε = {format_eps(e)}"


def answer(v: Verdict) -> list[str]:
    """The two sentences a team asks for first."""
    largest = _eps(v.rows[-1].epsilon) if v.rows else "—"
    expl = (
        f"from {_eps(v.explanations_from)} on, no explanation metric is distinguishably worse than ε = ∞"
        if v.explanations_from is not None
        else f"at every ε of the grid (up to {largest}) some explanation metric is distinguishably worse than ε = ∞"
    )
    acc = (
        f"from {_eps(v.accuracy_from)} on, test accuracy is not distinguishably worse than ε = ∞"
        if v.accuracy_from is not None
        else f"at every ε of the grid (up to {largest}) test accuracy is distinguishably worse than ε = ∞"
    )
    lines = [f"Explanations: {expl}.", f"Accuracy: {acc}."]
    status = {c.key: c.status for c in v.claims}
    readings = [(k, words) for k, words in CLAIM_A_READINGS if k in status]
    if readings:  # the paper's main claim, read four ways (docs/verdict.md)
        lines.append(
            "The paper's claim that explanations improve with ε, best at ∞: "
            + "; ".join(f"{words} {status[k]}" for k, words in readings)
            + "."
        )
    return lines


CLAIM_A_READINGS = (
    ("a", "on its own metrics"),
    ("a_matched", "on images matched for confidence and for masking sensitivity"),
    ("a_road", "on ROAD"),
    ("a_localisation", "on localisation (no masking)"),
)


def _cell(d: Difference, decimals: int) -> str:
    mark = WORSE if d.worse else BETTER if d.improved else ""
    return (mark + " " if mark else "") + d.words(decimals)


def difference_rows(v: Verdict, measures=MEASURES) -> tuple[list[str], list[list[str]]]:
    header = ["measure (ε − ∞)"] + [_eps(r.epsilon) for r in v.rows]
    body = [
        [f"{m.label} {'↑' if m.better == 'higher' else '↓'}"] + [_cell(r.diffs[m.key], m.decimals) for r in v.rows]
        for m in measures
        if any(m.key in r.diffs and r.diffs[m.key].mean is not None for r in v.rows)
    ]
    return header, body


def tracks_rows(v: Verdict) -> tuple[list[str], list[list[str]]]:
    """What the paper's metrics track: Spearman ρ of each with confidence Y and masking sensitivity S."""
    labels = {m.key: m.label for m in EXPLANATION}
    header = ["model"] + [f"{labels[k]}: ρ with Y / with S" for k in PAPER]
    body = [[name] + [f"{c[k][0]:+.2f} / {c[k][1]:+.2f}" if k in c else "—" for k in PAPER] for name, c in v.tracks]
    return header, [row for row in body if any(cell != "—" for cell in row[1:])]


TRACKS_NOTE = (
    "What the paper's metrics track: per-image Spearman correlation of each with the model's confidence Y in the "
    "explained class and with its sensitivity S to masking by a uniform map of the same mass (mean over seeds). A "
    "metric that follows S rewards a model that is insensitive to masking, whatever its map."
)


def provenance(runs: Sequence[Run], grid: GridConfig) -> str:
    """Where the numbers come from: protocol, devices, library versions recorded by the runs."""
    devices = sorted({r.train.device for r in runs})
    versions = sorted({f"{k} {v}" for r in runs for k, v in (r.train.versions or {}).items()})
    return (
        f"protocol `{grid.protocol}` (non-private runs: "
        + ("their own recipe, grid.nonprivate" if grid.protocol == "tuned" else "the train section's recipe")
        + f"); device {', '.join(devices)}; "
        + (", ".join(versions) if versions else "library versions not recorded")
    )


def markdown(verdicts: list[Verdict], runs: Sequence[Run], grid: GridConfig) -> str:
    out = [f"# Verdict: grid `{grid.name}`", ""]
    for v in verdicts:
        out += [f"## {v.model} — seeds {', '.join(map(str, v.seeds)) or '—'}", ""]
        out += [f"- **{line}**" for line in answer(v)] + [""]
        header, body = difference_rows(v)
        out += [
            "Differences to ε = ∞ (Gaussian DP-SGD; the same seed and the same test images; mean [95 % interval]; "
            f"{WORSE} distinguishably worse, {BETTER} distinguishably better):",
            "",
        ]
        out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        out += ["| " + " | ".join(row) + " |" for row in body] + [""]
        header, matched = difference_rows(v, MATCHED)
        if matched:
            out += [MATCHED_NOTE, ""]
            out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            out += ["| " + " | ".join(row) + " |" for row in matched] + [""]
        header, tracks = tracks_rows(v)
        if tracks:
            out += [TRACKS_NOTE, ""]
            out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            out += ["| " + " | ".join(row) + " |" for row in tracks] + [""]
        flagged = sorted({f for r in v.rows for f in r.flags})
        if flagged:
            out += ["Not to be trusted: " + "; ".join(flagged) + ".", ""]
        out += [
            "### The paper's claims on this data",
            "",
            "| claim | paper | verdict | the numbers |",
            "|---|---|---|---|",
        ]
        out += [f"| ({c.key}) {c.statement} | {c.source} | **{c.status}** | {c.evidence} |" for c in v.claims]
        out += ["", "Rules: " + " ".join(f"({c.key}) {c.rule}." for c in v.claims), ""]
        out += [f"_{note}_" for note in v.notes]
    out += [
        "",
        f"Provenance: {provenance(runs, grid)}. Intervals: seeds (Student t, Welch–Satterthwaite) combined "
        "with a paired bootstrap over test images (2000 resamples); definitions in docs/metrics.md.",
        "",
    ]
    return "\n".join(out)


def html_section(verdicts: list[Verdict], runs: Sequence[Run], grid: GridConfig) -> str:
    e = html.escape
    parts = ['<h2 id="verdict">Verdict</h2>']
    for v in verdicts:
        parts.append(f"<h3>{e(v.model)}: seeds {e(', '.join(map(str, v.seeds)) or '—')}</h3>")
        parts.append("<ul>" + "".join(f"<li><b>{e(line)}</b></li>" for line in answer(v)) + "</ul>")
        header, body = difference_rows(v)
        parts.append(
            '<p class="note">Differences to ε = ∞ (Gaussian DP-SGD; the same seed and the same test images; '
            f"mean [95 % interval]; {WORSE} distinguishably worse, {BETTER} distinguishably better).</p>"
        )
        parts.append(_table(header, body))
        header, matched = difference_rows(v, MATCHED)
        if matched:
            parts.append(f'<p class="note">{e(MATCHED_NOTE)}</p>' + _table(header, matched))
        header, tracks = tracks_rows(v)
        if tracks:
            parts.append(f'<p class="note">{e(TRACKS_NOTE)}</p>' + _table(header, tracks))
        parts.append(
            _table(
                ["claim", "paper", "verdict", "the numbers"],
                [[f"({c.key}) {c.statement}", c.source, c.status.upper(), c.evidence] for c in v.claims],
            )
        )
        parts.append('<p class="note">' + e(" ".join(f"({c.key}) {c.rule}." for c in v.claims)) + "</p>")
        parts += [f'<p class="deg">{e(n)}</p>' for n in v.notes]
    parts.append(f'<p class="note">Provenance: {e(provenance(runs, grid))}. <a href="verdict.md">verdict.md</a></p>')
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
