"""The verdict in words: ``reports/verdict.md`` and the section that opens ``reports/index.html``."""

from __future__ import annotations

import html
from collections.abc import Sequence

from dpcam.config import GridConfig
from dpcam.layout import VERDICT_MD, format_eps
from dpcam.records import CALIBRATION_BINS
from dpcam.report import methods_text
from dpcam.report.compare import (
    ACCURACY,
    BOTH_CORRECT,
    ECE,
    EXCLUDED,
    EXPLANATION,
    MATCHED,
    MEASURES,
    PAPER,
    PARTS,
    SPLIT,
    label,
)
from dpcam.report.markup import html_table, md_table
from dpcam.report.methods import ByMethod
from dpcam.report.paired import BETTER, WORSE, Difference
from dpcam.report.runs import Run
from dpcam.report.verdict import Answer, Verdict

MARKS = {"bh": "Benjamini–Hochberg (false-discovery rate 5 %)", "holm": "Holm (family-wise error 5 %)"}
MATCHED_NOTE = (
    "The paper's metrics on matched images (the same paired differences, on the images where the private and the "
    "non-private model of a seed are equally confident, |ΔY| ≤ 0.05, or equally sensitive to masking with a uniform "
    'map of the same mass, |ΔS| ≤ 5 points; docs/metrics.md, "What confounds the paper\'s metrics"), and on the '
    "images both classify correctly (a wrong answer's map is not the model's explanation of the right class); each "
    "cell names the images it rests on:"
)
TRACKS_NOTE = (
    "What the paper's metrics track: per-image Spearman correlation of each with the model's confidence Y in the "
    "explained class and with its sensitivity S to masking by a uniform map of the same mass (mean over seeds). A "
    "metric that follows S rewards a model that is insensitive to masking, whatever its map."
)
CLAIM_A_READINGS = (
    ("a", "on its own metrics"),
    ("a_matched", "on images matched for confidence and for masking sensitivity"),
    ("a_road", "on ROAD"),
    ("a_localisation", "on localisation (no masking)"),
)


def _eps(e: float | None) -> str:
    return "none" if e is None else f"ε = {format_eps(e)}"


def _failing(a: Answer) -> str:
    """Where the answer's non-inferiority fails first (from the largest ε down), and whether it could have held."""
    for eps in sorted({e for e, _ in a.cells}, reverse=True):
        bad = [k for (e, k), s in a.cells.items() if e == eps and s in ("not shown", "worse", "degenerate")]
        if bad:
            weak = [k for k in bad if a.underpowered.get((eps, k)) and a.cells[(eps, k)] == "not shown"]
            words = f"{_eps(eps)}: not shown for {', '.join(label(k).label for k in bad)}"
            if weak:
                words += (
                    f"; for {', '.join(label(k).label for k in weak)} the loss these seeds and images detect with "
                    "80 % power is larger than the margin: too few seeds to show non-inferiority even without a loss"
                )
            return words
    return ""


def answer(v: Verdict, runs: Sequence[Run] = ()) -> list[str]:
    """The sentences a team asks for first; with ``runs``, the accuracy sentence says when the reference trained
    more than the private runs (the effort line tells how much)."""
    largest = _eps(v.rows[-1].epsilon) if v.rows else "—"
    n = len(v.explanations.keys)
    if v.explanations_from is not None:
        expl = (
            f"from {_eps(v.explanations_from)} on, all {n} explanation metrics are shown to lose less than their "
            "margins against ε = ∞ (non-inferiority)"
        )
    else:
        expl = (
            f"at no ε of the grid (up to {largest}) are all {n} explanation metrics shown to lose less than their "
            f"margins against ε = ∞ ({_failing(v.explanations)})"
        )
    margin = v.config.margins[ACCURACY.key]
    if v.accuracy_from is not None:
        acc = f"from {_eps(v.accuracy_from)} on, test accuracy is shown to lose less than {margin:g} against ε = ∞"
    else:
        worst = v.rows[-1].diffs[ACCURACY.key] if v.rows else None
        acc = (
            f"at no ε of the grid (up to {largest}) is test accuracy shown to lose less than {margin:g} against "
            "ε = ∞" + (f" ({largest}: {worst.words()})" if worst is not None and worst.mean is not None else "")
        )
    worse = v.accuracy.at("worse")
    if worse:
        acc += f"; a loss larger than {margin:g} is shown at {', '.join(_eps(e) for e in worse)}"
    if " — " in effort(v, runs):
        acc += (
            " — against a reference that trained more than the private runs (Effort, below), so the loss includes "
            "that budget" + ("; the split below separates it" if any(r.split for r in v.rows) else "")
        )
    lines = [f"Explanations: {expl}.", f"Accuracy: {acc}."]
    lines += cost_lines(v)
    lines += group_lines(v)
    verdicts = {c.key: c.verdict for c in v.claims}
    readings = [(k, words) for k, words in CLAIM_A_READINGS if k in verdicts]
    if readings:
        lines.append(
            "The paper's claim that explanations improve with ε, best at ∞: "
            + "; ".join(f"{words} {verdicts[k]}" for k, words in readings)
            + " (the readings share the same ε = ∞ models: one claim, corrected together, not independent "
            "confirmations)."
        )
    return lines


def cost_lines(v: Verdict) -> list[str]:
    """What privacy costs, split: accuracy per ε, and which explanation parts are distinguishably worse."""
    rows = [r for r in v.rows if r.split]
    if not rows:
        return []
    acc = "; ".join(
        f"at {_eps(r.epsilon)} privacy (noise) costs {r.split[ACCURACY.key]['noise'].words()} on top of clipping "
        f"({r.split[ACCURACY.key]['clipping'].words()}) and the DP budget ({r.split[ACCURACY.key]['budget'].words()})"
        for r in rows
    )
    worse = [
        f"{_eps(r.epsilon)}: {label(k).label} ({part})"
        for r in rows
        for k in SPLIT[1:]
        for part in PARTS
        if r.split[k][part].mark == WORSE
    ]
    expl = (
        "what is distinguishably worse after the correction: " + "; ".join(worse)
        if worse
        else f"no part of any explanation metric is distinguishably worse after the correction over the "
        f"{v.families.get('split', 0)} cells of the split table (with {len(v.seeds)} seeds a cell needs a very "
        "small p-value to be marked: no evidence that explanations are unaffected)"
    )
    return [
        f"What ε costs in accuracy (ε − ∞ = noise + clipping + budget, the references trained with each ε's "
        f"schedule): {acc}. The clipping part compares clip-only, trained with the DP learning rate, with ε = ∞ at "
        "the learning rate tuned for it: clipping and the learning rate together; where those references are "
        "unstable over seeds, read clipping and budget as one part.",
        f"The same split for explanations (table below): {expl}.",
    ]


def _group_keys(v: Verdict) -> list[str]:
    keys: list[str] = []
    for r in v.rows:
        keys += [k for k in r.groups() if k not in keys]
    return [k for k in keys if k == ECE.key] + sorted(k for k in keys if k != ECE.key)


def group_lines(v: Verdict) -> list[str]:
    """Which classes pay for privacy (recall, ε − ∞) and what DP does to calibration."""
    recalls = [k for k in _group_keys(v) if k != ECE.key]
    out = []
    if recalls:
        worst = []
        for r in v.rows:
            ds = [(k, r.diffs[k]) for k in recalls if k in r.diffs and r.diffs[k].mean is not None]
            if ds:
                k, d = min(ds, key=lambda kd: kd[1].mean)
                worst.append(f"{_eps(r.epsilon)} {label(k).label} {d.words()}")
        marked = [
            f"{label(k).label} at {_eps(r.epsilon)}"
            for r in v.rows
            for k in recalls
            if k in r.diffs and r.diffs[k].mark == WORSE
        ]
        out.append(
            "Which classes pay (recall ε − ∞, the class with the largest point loss at each ε; a ranking of classes "
            "is not tested): "
            + "; ".join(worst)
            + (
                f"; distinguishably worse after the correction: {', '.join(marked)}"
                if marked
                else "; no class's loss is distinguishable after the correction"
            )
            + "."
        )
    cal = [
        f"{_eps(r.epsilon)} {r.diffs[ECE.key].words()}"
        for r in v.rows
        if ECE.key in r.diffs and r.diffs[ECE.key].mean is not None
    ]
    if cal:
        out.append(
            f"Calibration (expected calibration error ε − ∞, lower is better; against the tuned ε = ∞, so the budget "
            f"and clipping are in it, not split): {'; '.join(cal)}."
        )
    return out


def effort(v: Verdict, runs: Sequence[Run]) -> str:
    """How much training each side had (examples processed: epochs × images × views; optimiser steps)."""
    from dpcam.families import pick

    ref = pick(runs, family="baseline", scheme="none", model=v.model, schedule=None)

    def of(rs: Sequence[Run]) -> tuple[float, int]:
        return max(r.train.epochs * max(r.train.aug_mult, 1) for r in rs), max(r.train.steps or 0 for r in rs)

    if not ref or not v.rows:
        return ""
    e_ref, s_ref = of(ref)
    private = [(r.epsilon, *of(r.runs)) for r in v.rows]
    more = [e for e, ep, _ in private if ep < e_ref]
    steps = [e for e, ep, st in private if ep >= e_ref and st < s_ref]
    words = ", ".join(f"{_eps(e)} {ep:g} epochs ({st} steps)" for e, ep, st in private)
    head = f"Effort: the ε = ∞ reference trained {e_ref:g} epochs of examples ({s_ref} steps); the private runs {words}"
    tail = []
    if more:
        tail.append(f"the reference processed more examples than the private runs at {', '.join(map(_eps, more))}")
    if steps:
        tail.append(
            f"it took more optimiser steps (smaller batches, the same examples) than the runs at "
            f"{', '.join(map(_eps, steps))}"
        )
    if tail:
        return head + " — " + "; ".join(tail) + ": the gap to it includes that (the budget part)."
    return head + ": no private run had less training than the reference."


def audit_line(runs: Sequence[Run], model: str) -> str:
    """What the membership-inference audit shows, per training-set size: the largest empirical ε lower bound of
    ε = ∞ (can the attacks see anything there?) and of each private setting, and whether a DP run broke its bound.
    From-scratch runs on the prepared data only (local-DP data, public and fine-tuned runs audit other things), and
    not the split's references trained with a DP schedule (ε = ∞ here is the tuned non-private model)."""
    audited = [
        r
        for r in runs
        if r.audit is not None
        and r.spec.model == model
        and r.spec.scheme != "laplace-paper"  # no guarantee: nothing to check, and no ε to file it under
        and not (r.spec.ldp or r.spec.public or r.spec.trainable or r.spec.clip or r.spec.schedule)
    ]
    if not audited:
        return ""
    sizes, blind = [], []  # blind: sizes where even ε = ∞ shows nothing
    for n in sorted({r.train.train_size for r in audited}, reverse=True):
        at_n = [r for r in audited if r.train.train_size == n]
        if max((r.audit.mia_epsilon_lb for r in at_n if r.spec.scheme == "none"), default=1.0) <= 0:
            blind.append(n)
        cells: dict[tuple[int, float, str], list[float]] = {}
        for r in at_n:
            eps = r.spec.epsilon if r.spec.scheme in ("gaussian", "laplace") else None
            what = _eps(eps) if eps is not None else ("ε = ∞" if r.spec.scheme == "none" else r.spec.scheme)
            if r.spec.scheme == "laplace":
                what += " (Laplace)"
            cells.setdefault((eps is not None, -(eps or 0.0), what), []).append(r.audit.mia_epsilon_lb)
        words = ", ".join(
            f"{what} {max(lbs):.2f}" + (f" (max of {len(lbs)})" if len(lbs) > 1 else "")
            for (_, _, what), lbs in sorted(cells.items())
        )
        sizes.append(f"on {n} training images: {words}")
    checked = [r for r in runs if r.audit is not None and r.spec.model == model and r.audit.check.done]
    bad = [r.spec.name for r in checked if r.audit.violation]
    beyond = sorted(
        {
            format_eps(r.spec.epsilon)
            for r in checked
            if r.spec.epsilon is not None
            and (r.audit.check.epsilon_replace_one or 0) > r.audit.epsilon_lb_max_detectable
        },
        key=float,
    )
    tail = []
    if checked:
        runs_word = "run" if len(checked) == 1 else "runs"
        tail.append(
            f"{len(checked)} DP {runs_word} checked against their replace-one guarantee: "
            + (f"VIOLATION in {', '.join(bad)}" if bad else "no violation")
        )
    if beyond:
        tail.append(
            f"at ε = {', '.join(beyond)} the replace-one guarantee lies beyond the largest bound these samples can "
            "show, so only the trade-off curve can catch a violation there"
        )
    if blind:
        shown = ", ".join(map(str, blind))
        tail.append(f"where ε = ∞ shows 0 ({shown} images) the attacks see nothing and that check has no power")
    return (
        "Membership-inference audit (dpcam audit; the largest empirical ε lower bound over its attacks, 95 %, "
        "replace-one; 0: no leakage shown): "
        + ". ".join(["; ".join(sizes), *(["; ".join(tail)] if tail else [])])
        + "."
    )


def recipes(grid: GridConfig) -> str:
    """The recipes the grid trains the headline with, and the compute budget they were chosen under."""
    np = grid.nonprivate
    ref = (
        f"{np.optimizer} lr {np.lr:g}, momentum {np.momentum:g}, batch {np.batch_size}, {np.epochs} epochs, "
        f"{np.schedule}"
        if grid.protocol == "tuned"
        else "the train section's recipe"
    )
    parts = [f"ε = ∞: {ref}"]
    for name in grid.active_schedules():
        s = grid.schedules[name]
        eps = ", ".join(format_eps(e) for e in grid.gaussian if grid.schedule_of(e) == name)
        extra = "".join(
            [
                f" × {s.aug_mult} views" if s.aug_mult > 1 else "",
                f", EMA {s.ema:g}" if s.ema is not None else "",
                f", augment {s.augment}" if s.augment != "none" else "",
            ]
        )
        parts.append(
            f"ε = {eps} ({name} schedule): DP-SGD lr {s.lr:g}, momentum {s.momentum:g}, Poisson batches at rate "
            f"1/⌈N/{s.batch_size}⌉, {s.epochs} epochs{extra}, C {s.clip:g}; its ε = ∞ reference the same with lr "
            f"{s.reference_lr:g} and no clipping"
        )
    if not grid.schedules:
        parts.append("every ε: the train section's DP recipe")
    return (
        f"Recipes (each within the compute budget of {grid.budget} epochs of examples, grid.budget; chosen on an "
        "independent draw of the data, docs/recipes.md): " + "; ".join(parts) + "."
    )


def method(v: Verdict) -> list[str]:
    """How the numbers were made: the interval, the marks, the answer's test, the claims' correction."""
    s = len(v.seeds)
    return [
        f"Intervals: 95 %, paired by seed ({s} seed{'s' if s != 1 else ''}) and by test image; the seed part "
        "(S − 1 degrees of freedom) plus the image part the seeds share, with degrees of freedom calibrated so "
        "that the interval covers at least 95 % at every ratio of seed to image variance under a normal model of "
        'the per-seed means, which three seeds cannot check (docs/verdict.md, "The interval"). The intervals in '
        "the tables are unadjusted for multiplicity.",
        f"Marks {WORSE}/{BETTER} (distinguishably worse/better): {MARKS[v.config.marks]} over all cells of one "
        f"table — {v.families.get('main', 0)} cells in the table of differences, {v.families.get('matched', 0)} "
        "in the matched table.",
        '"Shown to lose less than the margin": non-inferiority — the whole 95 % interval lies on the better side '
        "of −margin (a one-sided 2.5 % test per cell); the answer needs it for every metric at every ε from X on "
        "(an intersection of tests: no correction needed). Margins (verdict.margins, fixed before the study) and "
        "the loss each comparison could detect are in the non-inferiority table.",
        "Claims: each rule below names the tests it combines and corrects them with Holm's method; a claim on one "
        "seed, a degenerate model or a missing partner is inconclusive and says so. Left out of the answer: "
        + "; ".join(f"{label(k).label} ({why})" for k, why in EXCLUDED.items())
        + ".",
    ]


def _cell(d: Difference, decimals: int, images: bool = False) -> str:
    if d.mean is None:
        return "—" + (f" ({d.problem})" if d.problem else "")
    return (d.mark + " " if d.mark else "") + d.words(decimals) + (f" (n {d.images_words()})" if images else "")


def difference_rows(v: Verdict, keys: Sequence[str], images: bool = False) -> tuple[list[str], list[list[str]]]:
    header = ["measure (ε − ∞)"] + [_eps(r.epsilon) for r in v.rows]
    body = []
    for k in keys:
        m = label(k)
        if any(k in r.diffs and r.diffs[k].mean is not None for r in v.rows):
            cells = [_cell(r.diffs[k], m.decimals, images) if k in r.diffs else "—" for r in v.rows]
            body.append([f"{m.label} {'↑' if m.better == 'higher' else '↓'}"] + cells)
    return header, body


def margin_rows(v: Verdict) -> tuple[list[str], list[list[str]]]:
    """Per measure of the answer: its margin, and per ε whether non-inferiority is shown, the interval's worst end
    (the largest loss the interval allows) and the loss the comparison could detect (80 % power)."""
    header = ["measure", "margin"] + [_eps(r.epsilon) for r in v.rows]
    body = []
    for a in (v.accuracy, v.explanations):
        for k in a.keys:
            m = label(k)
            cells = []
            for r in v.rows:
                d, state = r.diffs.get(k), a.cells.get((r.epsilon, k), "not measured")
                if d is None or d.mean is None:
                    cells.append(state)
                    continue
                f = f"{{:.{m.decimals}f}}"
                worst = d.worst_end()
                bound = f"loss ≤ {f.format(worst)}" if worst > 0 else f"no loss (gain ≥ {f.format(-worst)})"
                cells.append(f"{state}: {bound}, detectable {f.format(d.detectable())}")
            body.append([m.label, f"{v.config.margins[k]:g}"] + cells)
    return header, body


def tracks_rows(v: Verdict) -> tuple[list[str], list[list[str]]]:
    """What the paper's metrics track: Spearman ρ of each with confidence Y and masking sensitivity S."""
    labels = {m.key: m.label for m in EXPLANATION}
    header = ["model"] + [f"{labels[k]}: ρ with Y / with S" for k in PAPER]
    body = [[name] + [f"{c[k][0]:+.2f} / {c[k][1]:+.2f}" if k in c else "—" for k in PAPER] for name, c in v.tracks]
    return header, [row for row in body if any(cell != "—" for cell in row[1:])]


def claim_rows(v: Verdict) -> tuple[list[str], list[list[str]]]:
    header = ["claim", "paper", "verdict", "rests on", "the numbers"]
    return header, [[f"({c.key}) {c.statement}", c.source, c.verdict, c.basis, c.evidence] for c in v.claims]


def provenance(runs: Sequence[Run], grid: GridConfig) -> str:
    """Where the numbers come from: protocol, devices, library versions recorded by the runs."""
    devices = sorted({r.train.device for r in runs})
    versions = sorted({f"{k} {v}" for r in runs for k, v in (r.train.versions or {}).items()})
    deltas = sorted({(r.train.delta, r.train.train_size) for r in runs if r.train.epsilon and r.train.delta})
    k = max((r.train.group_size or 0 for r in runs if r.train.privacy_unit == "group"), default=0)
    who = (
        f"one patient of at most {k} training images (ε and δ per image converted by group privacy: kε, "
        "k·e^((k−1)ε)·δ, in train.json's group_epsilon and group_delta)"
        if k
        else "one training image"
    )
    unit = (
        f"privacy unit: {who}; "
        + ", ".join(f"δ·N = {d * n:.3g} (δ {d:g}, N {n})" for d, n in deltas)
        + " (δ ≥ 1/N is refused unless train.force_delta); "
        if deltas
        else ""
    )
    return (
        f"protocol `{grid.protocol}` (non-private runs: "
        + ("their own recipe, grid.nonprivate" if grid.protocol == "tuned" else "the train section's recipe")
        + f"); {unit}device {', '.join(devices)}; "
        + (", ".join(versions) if versions else "library versions not recorded")
    )


def _sections(v: Verdict) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """(note, table) of each table of one model's verdict, in order."""
    keys = [m.key for m in MEASURES]
    return [
        (
            f"Differences to ε = ∞ (Gaussian DP-SGD; the same seed and the same test images; mean [95 % interval, "
            f"unadjusted]; {WORSE}/{BETTER} distinguishably worse/better after {MARKS[v.config.marks]} over the "
            f"{v.families.get('main', 0)} cells of this table):",
            difference_rows(v, keys),
        ),
        (
            "Non-inferiority against ε = ∞: per measure its margin (the largest acceptable loss), and per ε whether "
            "the whole interval lies within it (shown / not shown), the largest loss the interval allows, and the "
            "smallest loss this comparison would detect with 80 % power (its seeds and images):",
            margin_rows(v),
        ),
        (
            MATCHED_NOTE + f" ({v.families.get('matched', 0)} cells, the same correction)",
            difference_rows(v, MATCHED + BOTH_CORRECT, True),
        ),
        (TRACKS_NOTE, tracks_rows(v)),
        (
            "What privacy costs, split: ε − ∞ = noise (ε − clip-only) + clipping (clip-only − ∞ with the ε's "
            "schedule) + budget (∞ with the ε's schedule − ∞ tuned), the references trained with each ε's DP schedule, "
            "same seeds "
            f"and images; {WORSE}/{BETTER} after {MARKS[v.config.marks]} over the {v.families.get('split', 0)} cells "
            "of this table:",
            split_rows(v),
        ),
        (
            "By class and calibration (DP's disparate impact, Bagdasaryan et al. 2019): each class's recall "
            f"(accuracy on its own test images) and the expected calibration error ({CALIBRATION_BINS} equal-width "
            "confidence bins), "
            f"ε − ∞, same seeds and images; {WORSE}/{BETTER} after {MARKS[v.config.marks]} over the "
            f"{v.families.get('groups', 0)} cells of this table:",
            difference_rows(v, _group_keys(v)),
        ),
    ]


def split_rows(v: Verdict) -> tuple[list[str], list[list[str]]]:
    rows = [r for r in v.rows if r.split]
    header = ["measure: part"] + [f"{_eps(r.epsilon)} ({r.schedule})" for r in rows]
    body = []
    for k in SPLIT:
        m = label(k)
        for part in PARTS:
            body.append([f"{m.label}: {part}"] + [_cell(r.split[k][part], m.decimals) for r in rows])
    return header, body if rows else []


FOREST_CAPTION = (
    "Each panel a measure, each ε its paired difference to ε = ∞ (mean over seeds, unadjusted 95 % interval; right of "
    "0 is better). Colour: the tables' ▲/▼ marks after the multiplicity correction, light where only the interval "
    "excludes 0. The answer below rests on non-inferiority tests against the margins, not on these marks."
)
DESCRIPTION_MAX = 5000  # characters: MLflow keeps a tag value of at most 5000 on every store


def description(
    verdicts: list[Verdict], runs: Sequence[Run], grid: GridConfig, methods: dict[str, ByMethod | None] | None = None
) -> str:
    """The verdict run's description in MLflow (Markdown): per model the answer, the claims' statuses and, with
    several explanation methods, what changes with the method; the rest is in its artifacts (verdict.md and the
    pictures)."""
    out = [f"**Verdict of grid `{grid.name}`** (every number: the artifact {VERDICT_MD})", ""]
    for v in verdicts:
        out += [f"### {v.model}: seeds {', '.join(map(str, v.seeds)) or '—'}", ""]
        out += [f"- {line}" for line in answer(v, runs)] + [""]
        out += ["Claims: " + "; ".join(f"({c.key}) {c.status}" for c in v.claims), ""]
        if (b := (methods or {}).get(v.model)) is not None:
            out += [f"- {line}" for line in methods_text.summary_lines(b)] + [""]
    text = "\n".join(out)
    return text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 1] + "…"


def markdown(
    verdicts: list[Verdict],
    runs: Sequence[Run],
    grid: GridConfig,
    methods: dict[str, ByMethod | None] | None = None,
    pictures: dict[str, str] | None = None,
) -> str:
    """verdict.md; ``methods``: model -> its verdict per explanation method (a section when there is one), with its
    picture's src in ``pictures``."""
    out = [f"# Verdict: grid `{grid.name}`", ""]
    for v in verdicts:
        out += [f"## {v.model} — seeds {', '.join(map(str, v.seeds)) or '—'}", ""]
        out += [f"- **{line}**" for line in answer(v, runs)] + [""]
        out += [recipes(grid), ""]
        if words := effort(v, runs):
            out += [words, ""]
        if words := audit_line(runs, v.model):
            out += [words, ""]
        out += ["How these statements were made:", ""] + [f"- {line}" for line in method(v)] + [""]
        for note, (header, body) in _sections(v):
            if body:
                out += [note, ""] + md_table(header, body) + [""]
        flagged = sorted({f for r in v.rows for f in r.flags})
        if flagged:
            out += ["Not to be trusted: " + "; ".join(flagged) + ".", ""]
        problems = v.problems()
        if problems:
            out += ["Could not be compared: " + "; ".join(problems) + ".", ""]
        out += ["### The paper's claims on this data", ""] + md_table(*claim_rows(v)) + [""]
        out += ["Rules: " + " ".join(f"({c.key}) {c.rule}." for c in v.claims), ""]
        out += [f"_{note}_" for note in v.notes]
        out += methods_text.markdown((methods or {}).get(v.model), (pictures or {}).get(v.model))
    out += ["", f"Provenance: {provenance(runs, grid)}. Definitions in docs/metrics.md and docs/verdict.md.", ""]
    return "\n".join(out)


def html_section(
    verdicts: list[Verdict],
    runs: Sequence[Run],
    grid: GridConfig,
    pictures: dict[str, str] | None = None,
    methods: dict[str, ByMethod | None] | None = None,
    method_pictures: dict[str, str] | None = None,
) -> str:
    """The verdict's section of index.html; ``pictures``: model -> the src of its forest plot (drawn first);
    ``methods`` / ``method_pictures``: as for :func:`markdown`."""
    e = html.escape
    parts = ['<h2 id="verdict">Verdict</h2>']
    for v in verdicts:
        parts.append(f"<h3>{e(v.model)}: seeds {e(', '.join(map(str, v.seeds)) or '—')}</h3>")
        if src := (pictures or {}).get(v.model):
            parts.append(
                f'<figure><img src="{e(src)}" alt="the verdict of {e(v.model)} as a forest plot"><figcaption>'
                f"{e(FOREST_CAPTION)}</figcaption></figure>"
            )
        parts.append("<ul>" + "".join(f"<li><b>{e(line)}</b></li>" for line in answer(v, runs)) + "</ul>")
        parts.append(f"<p>{e(recipes(grid))}</p>")
        if words := effort(v, runs):
            parts.append(f"<p>{e(words)}</p>")
        if words := audit_line(runs, v.model):
            parts.append(f"<p>{e(words)}</p>")
        parts.append('<ul class="note">' + "".join(f"<li>{e(line)}</li>" for line in method(v)) + "</ul>")
        for note, (header, body) in _sections(v):
            if body:
                parts.append(f'<p class="note">{e(note)}</p>' + html_table(header, body))
        problems = v.problems()
        if problems:
            parts.append(f'<p class="deg">Could not be compared: {e("; ".join(problems))}.</p>')
        header, body = claim_rows(v)
        parts.append(html_table(header, [[r[0], r[1], r[2].upper(), r[3], r[4]] for r in body]))
        parts.append('<p class="note">' + e(" ".join(f"({c.key}) {c.rule}." for c in v.claims)) + "</p>")
        parts += [f'<p class="deg">{e(n)}</p>' for n in v.notes]
        parts.append(methods_text.html_part((methods or {}).get(v.model), (method_pictures or {}).get(v.model)))
    parts.append(
        f'<p class="note">Provenance: {e(provenance(runs, grid))}. <a href="{VERDICT_MD}">{VERDICT_MD}</a></p>'
    )
    return "".join(parts)
