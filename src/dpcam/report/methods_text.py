"""The verdict by explanation method in words and tables: verdict.md's and index.html's section
(:mod:`dpcam.report.methods` computes it)."""

from __future__ import annotations

import html

from dpcam.layout import format_eps
from dpcam.report.claims import READINGS
from dpcam.report.markup import html_table, md_table
from dpcam.report.methods import ByMethod, MethodVerdict
from dpcam.report.paired import LEVEL, Difference

TITLE = "By explanation method (secondary: does the answer depend on the explainer?)"
FIGURE_CAPTION = (
    "Each method's ε − ∞ of every measure the answer tests (rows) at each ε, with the interval at the method's "
    "level (Bonferroni over the methods); right of 0 = better, the dashed line the largest acceptable loss. Green: "
    "not worse shown (the loss is within the margin); red: a loss beyond the margin shown; grey: neither."
)


def _eps(e: float | None) -> str:
    return "no ε" if e is None else f"ε = {format_eps(e)}"


def _pct(alpha: float) -> str:
    return f"{100 * alpha:.3g} %"


def _sanity(d: Difference, verdict: bool | None, alpha: float, yes: str, no: str) -> str:
    if d.mean is None:
        return "not measured"
    iv = d.interval(alpha)
    shown = f"{d.mean:+.3f} [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else f"{d.mean:+.3f}"
    return f"{yes if verdict else no}: {shown}"


def _claim(v: MethodVerdict, key: str) -> str:
    c = next(c for c in v.claims if c.key == key)
    return c.verdict


def summary_lines(b: ByMethod) -> list[str]:
    """What changes with the method, in a few sentences."""
    m = len(b.methods)
    answers = {v.method: v.answer.smallest for v in b.verdicts}
    told = "; ".join(f"{meth}: {_eps(e)}" for meth, e in answers.items())
    same = len(set(answers.values())) == 1
    level = _pct((1 - LEVEL) / 2 / m)
    verdict = (
        " — every method gives this answer; it compares what was shown, not the methods, and a cell not shown is"
        " often one these seeds lack the power for (verdict.md's detectable losses), so it does not say that the"
        " explainer does not matter."
        if same
        else " — the methods' answers differ (what was shown differs; the methods are not tested against each other)."
    )
    lines = [
        f"Smallest ε from which explanations are not worse, per method (each test one-sided at {level}, "
        f"Bonferroni over the {m} methods): {told}{verdict}"
    ]
    blind = [v.method for v in b.verdicts if v.sanity.depends_on_model is False]
    if blind:
        lines.append(
            "Read with care: the maps of "
            + ", ".join(blind)
            + " are not distinguishably closer to another trained model's than to a weight-randomised model's at "
            "ε = ∞ (the randomisation check), so their verdict may not be about the model."
        )
    worse = [
        f"{pair.replace('|', ' vs ')} at {_eps(e)}"
        for pair, row in b.agreement.items()
        for e, d in row
        if d.mark == "▼"
    ]
    lines.append(
        "The methods agree distinguishably less than at ε = ∞ (Holm over every pair × ε): " + "; ".join(worse) + "."
        if worse
        else "No pair of methods agrees distinguishably less at any ε than at ε = ∞ (Holm over every pair × ε); "
        "not distinguishable is not the same."
    )
    return lines


def method_rows(b: ByMethod) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "depends on the model? ρ(another trained model) − ρ(randomised model), ε = ∞",
        "masked score % − same map in random order, ε = ∞",
        "explanations not worse from",
        *[f"claim ({key.replace('_', ', ')})" for key, *_ in READINGS],
    ]
    body = []
    for v in b.verdicts:
        s = v.sanity
        body.append(
            [
                v.method + (" (headline)" if v is b.verdicts[0] else ""),
                _sanity(s.model_dependence, s.depends_on_model, b.alpha, "yes", "not shown") + _levels(s),
                _sanity(s.random_order, s.beats_random_order, b.alpha, "better", "not shown better"),
                _eps(v.answer.smallest) + " on",
                *[_claim(v, key) for key, *_ in READINGS],
            ]
        )
    return header, body


def _levels(s) -> str:
    if s.trained is None or s.randomised is None:
        return ""
    return f" (ρ {s.trained:.2f} with another trained model, {s.randomised:.2f} with a randomised one)"


def agreement_rows(b: ByMethod) -> tuple[list[str], list[list[str]]]:
    epsilons = sorted({e for row in b.agreement.values() for e, _ in row})
    header = ["methods", "ρ at ε = ∞"] + [f"ε = {format_eps(e)} − ∞" for e in epsilons]
    body = []
    for pair, row in b.agreement.items():
        level = b.reference_agreement.get(pair)
        cells = {e: (d.mark + " " if d.mark else "") + d.words(3) for e, d in row}
        body.append(
            [pair.replace("|", " vs "), "—" if level is None else f"{level:.3f}"]
            + [cells.get(e, "—") for e in epsilons]
        )
    return header, body


def rules(b: ByMethod) -> str:
    m = len(b.methods)
    return (
        f"Family: the {m} methods' answers, each test one-sided at {_pct((1 - LEVEL) / 2 / m)} (Bonferroni); claim (a) "
        f"per method: contradicted after Holm over every ε × metric cell of its four readings and of all {m} methods "
        f"together, reproduced after Holm at {_pct((1 - LEVEL) / m)} over its own tests; the sanity intervals at "
        f"{100 * (1 - b.alpha):.4g} %. The answer above (the headline method at 2.5 %) is the pre-specified one; a "
        "method's answer here may be stricter because of the smaller level. The margins are the verdict's, fixed on "
        "Grad-CAM's ε = ∞ seeds and not re-fitted per method: another method's \"not worse\" means a loss smaller "
        "than a Grad-CAM-sized one. Agreement: Spearman's ρ of two methods' "
        "maps of the same image, ε − ∞ paired by seed and image, 95 % intervals, ▲ / ▼ after Holm over every pair "
        f"× ε ({sum(len(r) for r in b.agreement.values())} tests, a family of its own). The sanity check pairs each "
        "seed's model with the next seed's, so its seeds share models and its interval may be somewhat narrow. Seeds "
        f"{', '.join(map(str, b.seeds))}; the other families are scored with the headline method alone."
    )


def markdown(b: ByMethod | None, picture: str | None = None) -> list[str]:
    if b is None:
        return []
    out = [f"### {TITLE} — {b.model}", ""]
    if picture:
        out += [f"![{FIGURE_CAPTION}]({picture})", ""]
    out += [f"- **{line}**" for line in summary_lines(b)] + [""]
    out += md_table(*method_rows(b)) + [""]
    out += ["Agreement between methods (Spearman's ρ of their maps of the same image):", ""]
    out += md_table(*agreement_rows(b)) + [""]
    out += [rules(b), ""]
    return out


def html_part(b: ByMethod | None, picture: str | None = None) -> str:
    if b is None:
        return ""
    e = html.escape
    parts = [f"<h3>{e(TITLE)}: {e(b.model)}</h3>"]
    if picture:
        parts.append(
            f'<figure><img src="{e(picture)}" alt="the verdict per explanation method">'
            f"<figcaption>{e(FIGURE_CAPTION)}</figcaption></figure>"
        )
    parts.append("<ul>" + "".join(f"<li><b>{e(line)}</b></li>" for line in summary_lines(b)) + "</ul>")
    parts.append(html_table(*method_rows(b)))
    parts.append('<p class="note">Agreement between methods (Spearman\'s ρ of their maps of the same image):</p>')
    parts.append(html_table(*agreement_rows(b)))
    parts.append(f'<p class="note">{e(rules(b))}</p>')
    return "".join(parts)
