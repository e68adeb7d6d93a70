"""The verdict by explanation method (``explain.methods``): does "DP costs explanations from ε = X" depend on the
explainer? (docs/verdict.md, "By explanation method").

For every method the explain stage scored in the headline families (baseline and gaussian), the same paired
differences as the verdict (:func:`dpcam.report.compare.eps_rows`) on that method's maps, and from them:

- the answer, "from ε = X on, explanations are not worse", with each one-sided test at 2.5 % / m (Bonferroni over
  the m methods: the family is the m answers, so that reading every method's answer together keeps the chance of
  a wrong "not worse" below 2.5 %);
- claim (a) on each reading, "contradicted" after Holm over the ε × metric cells of all readings **and all
  methods** together, "reproduced" after Holm at 5 % / m over its own tests;
- the method's own sanity at ε = ∞: its maps agree more with another trained model's than with a weight-randomised
  model's (Adebayo et al. 2018), and its paper metric beats the same map's pixels in random order;
- the agreement between methods (Spearman's ρ of two methods' maps of the same image) at each ε against ∞: does DP
  make the explainers disagree more?

The headline method's verdict (the main answer) stays the one of :mod:`dpcam.report.verdict`, at 2.5 %: it was
fixed before the study; this analysis is secondary and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpcam import names
from dpcam.config import GridConfig, VerdictConfig
from dpcam.errors import UserError
from dpcam.families import pick
from dpcam.report.claims import Claim, claims_a
from dpcam.report.compare import HEADLINE, EpsRow, Measure, compare, eps_rows
from dpcam.report.paired import LEVEL, Difference, correct, paired_mean
from dpcam.report.runs import Run
from dpcam.report.verdict import Answer, answer


@dataclass
class Sanity:
    """A method's checks on the non-private runs (ε = ∞), paired per image over their seeds."""

    model_dependence: Difference  # ρ with another trained model's maps − ρ with the randomised model's
    random_order: Difference  # masked score % − masked score % of the same map's pixels in random order
    alpha: float
    trained: float | None = None  # mean ρ with another trained model's maps
    randomised: float | None = None  # mean ρ with the randomised model's maps

    @property
    def depends_on_model(self) -> bool | None:
        """The maps agree distinguishably more with another trained model's than with a randomised model's (the
        interval at level 1 − α above 0); None when not measured."""
        iv = self.model_dependence.interval(self.alpha)
        return None if iv is None else iv[0] > 0

    @property
    def beats_random_order(self) -> bool | None:
        iv = self.random_order.interval(self.alpha)
        return None if iv is None else iv[0] > 0


@dataclass
class MethodVerdict:
    method: str
    rows: list[EpsRow]
    answer: Answer
    claims: list[Claim]
    sanity: Sanity


@dataclass
class ByMethod:
    model: str
    methods: list[str]
    verdicts: list[MethodVerdict]
    # "<a>|<b>" -> per ε: (ε, agreement at ε − agreement at ∞), marked by Holm over every pair × ε
    agreement: dict[str, list[tuple[float, Difference]]]
    reference_agreement: dict[str, float | None]  # "<a>|<b>" -> mean ρ at ε = ∞
    alpha: float  # each method's level: (1 − LEVEL) / m
    seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _headline(runs: list[Run], model: str) -> list[Run]:
    """The runs of ``model`` in the families scored with every method (baseline, gaussian)."""
    return [r for f in names.HEADLINE_FAMILIES for r in pick(runs, family=f, model=model)]


def scored_methods(runs: list[Run], model: str) -> list[str]:
    """The methods every headline-family run of ``model`` was scored with, in explain.methods order."""
    head = _headline(runs, model)
    return [m for m in head[0].methods if all(m in r.methods for r in head)] if head else []


def _sanity(refs: list[Run], alpha: float) -> Sanity:
    def pairs(a: str, b: str):
        return [(r.per_image[a], r.per_image[b]) for r in refs if a in r.per_image and b in r.per_image]

    def level(key: str) -> float | None:
        values = [np.nanmean(r.per_image[key]) for r in refs if key in r.per_image]
        return float(np.mean(values)) if values else None

    return Sanity(
        paired_mean(pairs("map_agreement", "randomisation_agreement")),
        paired_mean(pairs("masked_score_pct", "masked_score_random_pct")),
        alpha,
        level("map_agreement"),
        level("randomisation_agreement"),
    )


def _agreement(head: list[Run], model: str, methods: list[str]):
    """Per pair of methods, the agreement of their maps at each ε − at ∞ (Holm over all pairs × ε) and at ∞."""
    views = [r.method_agreement() for r in head]
    ref = pick(views, family="baseline", scheme="none", model=model, schedule=None)
    at = pick(views, family="gaussian", model=model)
    epsilons = sorted({r.spec.epsilon for r in at if r.spec.epsilon is not None})
    out: dict[str, list[tuple[float, Difference]]] = {}
    level: dict[str, float | None] = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            key = f"{a}|{b}"
            m = Measure(key, f"agreement of {a} and {b}", "higher")
            out[key] = [(e, compare(pick(at, epsilon=e), ref, m)) for e in epsilons]
            level[key] = float(np.mean([np.nanmean(r.per_image[key]) for r in ref])) if ref else None
    correct([d for row in out.values() for _, d in row], "holm")
    return out, level


def by_method(runs: list[Run], grid: GridConfig, model: str, config: VerdictConfig | None = None) -> ByMethod | None:
    """The verdict per explanation method, or None when the runs were scored with one method only."""
    config = config or VerdictConfig()
    methods = scored_methods(runs, model)
    if len(methods) < 2:
        return None
    head = _headline(runs, model)
    alpha = (1 - LEVEL) / len(methods)
    schedules = {e: grid.schedule_of(e) for e in grid.gaussian}
    try:
        views = {m: [r.of_method(m) for r in head] for m in methods}
    except UserError as e:
        raise UserError(f"{e}; run `dvc repro` so that every explain.methods entry is scored") from None
    rows = {m: eps_rows(views[m], "gaussian", model, schedules) for m in methods}
    verdicts = []
    for m in methods:
        others = [rows[o] for o in methods if o != m]
        refs = pick(views[m], family="baseline", scheme="none", model=model, schedule=None)
        verdicts.append(
            MethodVerdict(
                m,
                rows[m],
                answer(rows[m], HEADLINE, config.margins, alpha),
                claims_a(rows[m], others, alpha),
                _sanity(refs, alpha),
            )
        )
    agreement, level = _agreement(head, model, methods)
    seeds = sorted({r.spec.seed for r in head})
    return ByMethod(model, methods, verdicts, agreement, level, alpha, seeds)
