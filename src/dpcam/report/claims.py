"""The paper's claims (Naidu et al. 2021), each checked on this data by a rule fixed before any result.

Every claim is **reproduced**, **contradicted** or **inconclusive**; the rules (docs/verdict.md,
"The paper's claims") follow four principles:

- a non-distinguishable difference is neither reproduced nor contradicted;
- a trend ("improves with ε") needs two ε: the smallest ε worse than the reference *and* the
  largest ε better than the smallest, not one cell;
- a claim that combines several tests uses Holm's correction over them (its family is named in
  the rule); a conjunction of tests that must all hold needs none;
- a claim decided on one seed, on a degenerate or undertrained model, on a run without a partner
  seed or on an unreadable file is inconclusive, and says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dpcam.config import GridConfig, VerdictConfig
from dpcam.families import pick
from dpcam.layout import format_eps
from dpcam.report.compare import (
    ACCURACY,
    CONFIDENCE_CALIPER,
    CONFIDENCE_KEY,
    LOCALISATION,
    MATCHES,
    PAPER,
    ROAD,
    SENSITIVITY_CALIPER,
    SENSITIVITY_KEY,
    EpsRow,
    compare,
    flags,
    label,
)
from dpcam.report.paired import LEVEL, Difference, holm_rejects
from dpcam.report.runs import Run

LARGE_GAP = 0.05  # claim (b): a "large" accuracy gap is at least 5 percentage points


@dataclass
class Claim:
    key: str
    statement: str
    source: str
    status: str  # reproduced | contradicted | inconclusive
    evidence: str
    rule: str
    basis: str = ""  # the seeds it rests on and what its intervals cover
    reason: str = ""  # why inconclusive: one seed, degenerate, not measured, a problem
    problems: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.status + (f" ({self.reason})" if self.status == "inconclusive" and self.reason else "")


def _gain(d: Difference) -> float:
    """The difference in the metric's better direction (> 0: the first side is better)."""
    return 0.0 if d.mean is None else (d.mean if d.better == "higher" else -d.mean)


def _words(d: Difference, key: str) -> str:
    m = label(key)
    return f"{m.label} {d.words(m.decimals)}"


def _seeds(runs: list[Run]) -> list[int]:
    return sorted({r.spec.seed for r in runs})


def _basis(runs: list[Run]) -> str:
    seeds = _seeds(runs)
    if len(seeds) >= 2:
        return f"seeds {', '.join(map(str, seeds))}: intervals cover training seeds and test images"
    return f"seed {seeds[0] if seeds else '—'} only: intervals cover test images only"


def _settle(c: Claim, status: str, diffs: list[Difference], runs: list[Run], flagged: list[str]) -> Claim:
    """``status`` unless a guard makes the claim inconclusive — a problem, nothing measured, one seed, a flagged
    (degenerate or undertrained) run — naming every guard that applies."""
    c.basis = _basis(runs) if runs else "no runs"
    c.problems = sorted({d.problem for d in diffs if d.problem})
    measured = [d for d in diffs if d.mean is not None]
    reasons = list(c.problems)
    if not c.problems and not measured:
        reasons.append(c.reason or "not measured")
    if measured and (len(_seeds(runs)) < 2 or min(d.seeds for d in measured) < 2):
        reasons.append("one seed")
    if flagged:
        reasons.append("; ".join(flagged[:3]) + (f" (and {len(flagged) - 3} more)" if len(flagged) > 3 else ""))
    if reasons:
        c.status, c.reason = "inconclusive", "; ".join(reasons)
    else:
        c.status = status
    return c


# ------------------------------------------------------------------------------------ (a): a trend over ε


def _better_than_reference(
    rows: list[EpsRow], keys: list[str], others: Sequence[list[EpsRow]] = ()
) -> tuple[set[tuple[float, str]], int]:
    """The (ε, key) cells of ``rows`` distinguishably better than ∞ after Holm over every ε × key cell of ``rows``
    and of ``others`` (the family: the same claim read on other explanation methods' maps)."""
    mine = {id(r) for r in rows}
    cells = [(r, k) for rr in (rows, *others) for r in rr for k in keys if k in r.diffs]
    rejected = holm_rejects([r.diffs[k].p for r, k in cells])
    better = {(r.epsilon, k) for (r, k), rej in zip(cells, rejected) if rej and _gain(r.diffs[k]) > 0 and id(r) in mine}
    return better, len(cells)


def _trend(
    rows: list[EpsRow], groups: list[tuple[str, ...]], need: int, better: set[tuple[float, str]], alpha: float
) -> tuple[str, str, list[Difference], int]:
    """(status, evidence, differences used, gap-and-rise tests) of "quality improves with ε, best at ∞".

    ``better``: the cells distinguishably better than ∞ after the contradiction family's correction (all readings
    of claim (a) together: :func:`claims_a`). Contradicted when some ε is better than ∞ on at least ``need`` keys
    of a group. Reproduced when no cell of these groups is better than ∞ at level ``alpha`` (uncorrected: the guard
    can only block) and, in every group, at least ``need`` keys show both the gap (smallest ε worse than ∞) and the
    rise (largest ε better than the smallest), Holm at ``alpha`` over those 2 × |group| tests."""
    everything = [r.diffs[k] for r in rows for g in groups for k in g if k in r.diffs]
    if any(d.problem for d in everything):
        return "inconclusive", "", everything, 0
    rows = [r for r in rows if any(r.diffs.get(k) and r.diffs[k].mean is not None for g in groups for k in g)]
    if len(rows) < 2:
        return "inconclusive", "fewer than two ε measured", everything, 0
    low, high = rows[0], rows[-1]
    for g in groups:
        for r in rows:
            hits = [k for k in g if (r.epsilon, k) in better]
            if len(hits) >= min(need, len(g)):
                words = "; ".join(_words(r.diffs[k], k) for k in hits)
                return "contradicted", f"ε = {format_eps(r.epsilon)} − ∞: {words} (better than ∞)", everything, 0
    rises = {k: _rise(high, low, k) for g in groups for k in g}
    passed, tests = [], 0
    for g in groups:
        tests_g = [low.diffs[k] for k in g] + [rises[k] for k in g]
        rej = holm_rejects([d.p for d in tests_g], alpha)
        n = len(g)
        ok = [k for i, k in enumerate(g) if rej[i] and _gain(low.diffs[k]) < 0 and rej[n + i] and _gain(rises[k]) > 0]
        passed.append(len(ok) >= min(need, len(g)))
        tests += len(tests_g)
    keys = [k for g in groups for k in g]
    evidence = (
        f"ε = {format_eps(low.epsilon)} − ∞: " + "; ".join(_words(low.diffs[k], k) for k in keys) + "; "
        f"ε = {format_eps(high.epsilon)} − ε = {format_eps(low.epsilon)}: "
        + "; ".join(_words(rises[k], k) for k in keys)
    )
    # the guard at the tests' own level, uncorrected: a cell better than ∞ at that level blocks "reproduced" (after
    # the contradiction family's correction it would only repeat "contradicted" and never block on its own)
    blocked = any(
        (d := r.diffs.get(k)) is not None and d.p is not None and d.p <= alpha and _gain(d) > 0
        for r in rows
        for k in keys
    )
    status = "reproduced" if all(passed) and not blocked else "inconclusive"
    return status, evidence, everything + list(rises.values()), tests


def _rise(high: EpsRow, low: EpsRow, key: str) -> Difference:
    base, _, match = key.partition("|")
    return compare(high.runs, low.runs, label(base), (match, dict(MATCHES)[match]) if match else None)


TREND_RULE = (
    "reproduced when, on at least {need} of {what}, the smallest ε is worse than ∞ and the largest ε better than "
    "the smallest (Holm over these {tests} tests), and no ε is better than ∞ on any of them, uncorrected at the same "
    "level (a guard: it can only block); "
    "contradicted when some ε is better than ∞ on at least {need} of them, Holm over the {family} ε × metric cells "
    "of all four readings of (a) together (they share the ε = ∞ models and are one claim); otherwise inconclusive"
)
# (key, statement, paper source, groups of keys, how many of a group must agree, the words for the rule)
READINGS = (
    (
        "a",
        "Explanation quality improves with ε, best at ε = ∞ — on the paper's metrics",
        "Table 1, Fig. 2, 5",
        [PAPER],
        2,
        "the paper's 3 metrics (Average Drop, Increase in Confidence, masked score)",
    ),
    (
        "a_matched",
        "… on the matched metrics (confidence- and masking-sensitivity-matched images)",
        "Table 1",
        [tuple(f"{k}|{match}" for k in PAPER) for match, _ in MATCHES],
        2,
        f"the paper's 3 metrics on confidence-matched images (|ΔY| ≤ {CONFIDENCE_CALIPER:g}) and, separately, on "
        f"masking-sensitivity-matched images (|ΔS| ≤ {SENSITIVITY_CALIPER:g} points) — both for reproduced, either "
        "for contradicted",
    ),
    ("a_road", "… on ROAD (imputation instead of black masking)", "—", [ROAD], 1, "ROAD's LeRF − MoRF gap"),
    (
        "a_localisation",
        "… on localisation (lesion masks; no masking of the input)",
        "—",
        [LOCALISATION],
        1,
        "the pointing game and the energy pointing game",
    ),
)


def claims_a(rows: list[EpsRow], others: Sequence[list[EpsRow]] = (), alpha: float = 1 - LEVEL) -> list[Claim]:
    """Claim (a) read four ways; "contradicted" on any reading is corrected over all readings' cells together (and
    over ``others``' cells: the rows of other explanation methods); "reproduced" tests Holm's at level ``alpha``."""
    keys = [k for *_, groups, _, _ in READINGS for g in groups for k in g]
    better, family = _better_than_reference(rows, keys, others)
    out = []
    for key, statement, source, groups, need, what in READINGS:
        status, evidence, used, tests = _trend(rows, groups, need, better, alpha)
        rule = TREND_RULE.format(need=need, what=what, tests=tests or "its", family=family)
        c = Claim(key, statement, source, "inconclusive", evidence, rule)
        out.append(_settle(c, status, used, [r for row in rows for r in row.runs], [f for r in rows for f in r.flags]))
    matched = next(c for c in out if c.key == "a_matched")
    counts = [
        f"{m}-matched {row.diffs[k].images_words()} at ε = {format_eps(row.epsilon)}"
        for m, k in (("confidence", f"{PAPER[2]}|{CONFIDENCE_KEY}"), ("sensitivity", f"{PAPER[2]}|{SENSITIVITY_KEY}"))
        for row in rows
        if k in row.diffs and row.diffs[k].mean is not None
    ]
    if counts:
        matched.evidence += " (images: " + "; ".join(counts) + ")"
    return out


# ------------------------------------------------------------------------------------ (b): accuracy gap


def claim_b(runs: list[Run], model: str) -> Claim:
    rule = (
        f"reproduced when accuracy(ε = 5) − accuracy(ε = 1), paired, is shown to be at least {100 * LARGE_GAP:g} "
        f"points (its interval lies above {LARGE_GAP:g}); contradicted when shown to be smaller (the interval lies "
        f"below {LARGE_GAP:g}); otherwise inconclusive"
    )
    c = Claim("b", "A large accuracy gap between ε = 1 and ε = 5", "Fig. 3", "inconclusive", "", rule)
    g = pick(runs, family="gaussian", model=model)
    one, five = pick(g, epsilon=1), pick(g, epsilon=5)
    if not one or not five:
        c.reason = "not measured: the grid has no Gaussian runs at ε = 1 and 5"
        return _settle(c, "inconclusive", [], one + five, [])
    d = compare(five, one, ACCURACY)
    c.evidence = f"accuracy(ε = 5) − accuracy(ε = 1) = {d.words()}"
    e1, e5 = ({getattr(r.train, "epochs", None) for r in side} for side in (one, five))
    if None not in e1 | e5 and e1 != e5:  # per-band DP schedules (grid.schedules)
        c.evidence += (
            f"; not ε alone: ε = 1 trained {'/'.join(map(str, sorted(e1)))} epochs and ε = 5 "
            f"{'/'.join(map(str, sorted(e5)))} (their DP schedules), so the gap includes that difference"
        )
    status = "inconclusive"
    if d.lo is not None:
        status = "reproduced" if d.lo > LARGE_GAP else "contradicted" if d.hi < LARGE_GAP else "inconclusive"
    return _settle(c, status, [d], one + five, flags(one + five))


# ------------------------------------------------------------------------------------ (c): Laplace vs Gaussian


def _pair_family(runs: list[Run], model: str) -> tuple[str, str]:
    """The valid Laplace / Gaussian pair that learns: fine-tuned on the public trunk when the grid has it."""
    fam = "finetune-" if pick(runs, family="finetune-laplace", model=model) else ""
    return fam, "fine-tuned on the public trunk" if fam else "from scratch"


def claim_c(runs: list[Run], model: str, config: VerdictConfig) -> Claim:
    """Tables 1–2 put Laplace ahead of Gaussian on all three metrics at ε = 1, 5 and 10: the claim tested is
    superiority ("Laplace explains better"), on the valid pair that learns; the replica never decides."""
    rule = (
        "Laplace − Gaussian on the paper's 3 metrics at every ε both have (Holm over all of them): reproduced when "
        "at every shared ε Laplace is better on at least 2 and worse on none; contradicted when at some ε Gaussian "
        "is better on at least 2, or when at every shared ε Laplace's advantage is shown to be below the margin "
        "(its interval's better end < verdict.margins) on at least 2; otherwise inconclusive. laplace-paper "
        "(NO guarantee) is reported, never counted"
    )
    statement = "Laplace DP-SGD explains better than Gaussian at equal ε (Tables 1–2: ahead on all 3 metrics)"
    c = Claim("c", statement, "Tables 1–2", "inconclusive", "", rule)
    fam, how = _pair_family(runs, model)
    lap, gau = pick(runs, family=f"{fam}laplace", model=model), pick(runs, family=f"{fam}gaussian", model=model)
    shared = sorted({r.spec.epsilon for r in lap} & {r.spec.epsilon for r in gau})
    if not shared:
        c.reason = "not measured: the grid has no Laplace and Gaussian runs at a shared ε (`make paper PROFILE=full`)"
        return _settle(c, "inconclusive", [], lap + gau, [])
    cells = [(e, k, compare(pick(lap, epsilon=e), pick(gau, epsilon=e), label(k))) for e in shared for k in PAPER]
    rej = holm_rejects([d.p for _, _, d in cells])
    better = {e: [k for (x, k, d), r in zip(cells, rej) if x == e and r and _gain(d) > 0] for e in shared}
    worse = {e: [k for (x, k, d), r in zip(cells, rej) if x == e and r and _gain(d) < 0] for e in shared}
    below = {
        e: [k for x, k, d in cells if x == e and d.best_end() is not None and d.best_end() < config.margins[k]]
        for e in shared
    }
    if all(len(better[e]) >= 2 for e in shared) and not any(worse.values()):
        status = "reproduced"
    elif any(len(worse[e]) >= 2 for e in shared) or all(len(below[e]) >= 2 for e in shared):
        status = "contradicted"
    else:
        status = "inconclusive"
    c.evidence = (
        f"valid Laplace − Gaussian, both {how}: "
        + "; ".join(f"ε = {format_eps(e)}: " + ", ".join(_words(d, k) for x, k, d in cells if x == e) for e in shared)
        + f" (Holm over {len(cells)} tests)"
    )
    involved = [r for e in shared for r in pick(lap + gau, epsilon=e)]
    c = _settle(c, status, [d for *_, d in cells], involved, flags(involved))
    replica = _replica(runs, model)
    if replica:
        c.evidence += f" [not counted: the replica laplace-paper (NO guarantee) − Gaussian, from scratch, {replica}]"
    return c


def _replica(runs: list[Run], model: str) -> str:
    lap, gau = pick(runs, family="laplace-paper", model=model), pick(runs, family="gaussian", model=model)
    shared = sorted({r.spec.epsilon for r in lap} & {r.spec.epsilon for r in gau})
    return "; ".join(
        f"ε = {format_eps(e)}: "
        + ", ".join(_words(compare(pick(lap, epsilon=e), pick(gau, epsilon=e), label(k)), k) for k in PAPER)
        for e in shared
    )


def claim_c_low(runs: list[Run], model: str) -> Claim:
    rule = (
        "on the same Laplace family as (c): reproduced when every ε = 0.5 Laplace model is degenerate; contradicted "
        "when none is; otherwise inconclusive"
    )
    c = Claim("c_low", "Laplace at ε = 0.5 is too private to learn", "Table 2, Fig. 5", "inconclusive", "", rule)
    fam, how = _pair_family(runs, model)
    low = pick(runs, family=f"{fam}laplace", model=model, epsilon=0.5)
    if not low:
        c.reason = "not measured: the grid has no Laplace run at ε = 0.5 (add 0.5 to grid.laplace)"
        return _settle(c, "inconclusive", [], [], [])
    deg = [r.degenerate for r in low]
    c.evidence = f"Laplace ε = 0.5 ({how}): " + ", ".join(
        f"{r.spec.name} accuracy {r.train.test_accuracy:.3f}{' (degenerate)' if r.degenerate else ''}" for r in low
    )
    status = "reproduced" if all(deg) else "contradicted" if not any(deg) else "inconclusive"
    stand_in = Difference(0.0, 0.0, 0.0, len(_seeds(low)), 1)  # the claim rests on the runs themselves
    return _settle(c, status, [stand_in], low, [f"{r.spec.name} is undertrained" for r in low if r.undertrained])


# ------------------------------------------------------------------------------------ (d): local DP


def claim_d(runs: list[Run], model: str) -> Claim:
    rule = (
        "one mechanism's most private (smallest ε) and least private (largest ε) local-DP models, the paper's 3 "
        "metrics, Holm over the 6 tests: reproduced when on at least 2 metrics the smallest ε is worse than ∞ and "
        "worse than the largest ε; contradicted when on at least 2 it is better than ∞ or better than the largest "
        "ε; otherwise inconclusive"
    )
    c = Claim("d", "Local-DP explanations degrade as ε falls", "Fig. 2, 4", "inconclusive", "", rule)
    ldp = [r for r in pick(runs, family="ldp", model=model) if r.spec.epsilon is not None]
    ref = pick(runs, family="baseline", scheme="none", model=model, schedule=None)
    if not ldp or not ref:
        c.reason = "not measured: the grid has no local-DP runs (`make paper PROFILE=full` has them)"
        return _settle(c, "inconclusive", [], [], [])
    mechs = sorted({r.spec.ldp.rsplit("-eps")[0] for r in ldp})
    mech = "singh-sikka" if "singh-sikka" in mechs else mechs[0]
    own = [r for r in ldp if r.spec.ldp.startswith(mech)]
    eps = sorted({r.spec.epsilon for r in own})
    if len(eps) < 2:
        c.reason = f"not measured: {mech} has one ε in the grid; a trend needs two"
        return _settle(c, "inconclusive", [], own, [])
    low, high = pick(own, epsilon=eps[0]), pick(own, epsilon=eps[-1])
    gap = {k: compare(low, ref, label(k)) for k in PAPER}
    trend = {k: compare(high, low, label(k)) for k in PAPER}
    tests = list(gap.values()) + list(trend.values())
    rej = holm_rejects([d.p for d in tests])
    n = len(PAPER)
    rep = [k for i, k in enumerate(PAPER) if rej[i] and _gain(gap[k]) < 0 and rej[n + i] and _gain(trend[k]) > 0]
    con = [k for i, k in enumerate(PAPER) if (rej[i] and _gain(gap[k]) > 0) or (rej[n + i] and _gain(trend[k]) < 0)]
    status = "reproduced" if len(rep) >= 2 else "contradicted" if len(con) >= 2 else "inconclusive"
    lo, hi = format_eps(eps[0]), format_eps(eps[-1])
    c.evidence = (
        f"{mech} ε = {lo} − ∞: "
        + "; ".join(_words(gap[k], k) for k in PAPER)
        + f"; ε = {hi} − ε = {lo}: "
        + "; ".join(_words(trend[k], k) for k in PAPER)
    )
    pairs_ref = [r for r in ref if r.spec.seed in {x.spec.seed for x in low}]
    return _settle(c, status, tests, low + high, flags(low + high + pairs_ref))


# ------------------------------------------------------------------------------------ (e): masked score


def claim_e(rows: list[EpsRow]) -> Claim:
    rule = (
        "reproduced when the masked score at ε = ∞ is above the largest ε's (the jump) and the largest ε's above "
        "the smallest ε's (the rise), each at 5 % (both must hold: no correction); contradicted when either is "
        "shown the other way (Holm over the 2); otherwise inconclusive"
    )
    c = Claim("e", "The masked score rises with ε and jumps from ε = 10 to ∞", "Fig. 6a", "inconclusive", "", rule)
    if len(rows) < 2:
        c.reason = "not measured: fewer than two Gaussian ε"
        return _settle(c, "inconclusive", [], [], [])
    key = "masked_score_pct"
    jump = rows[-1].diffs[key]  # largest ε − ∞: the jump shows as a loss
    rise = compare(rows[-1].runs, rows[0].runs, label(key))
    c.evidence = (
        f"masked score % ε = {format_eps(rows[-1].epsilon)} − ∞: {jump.words(2)}; "
        f"ε = {format_eps(rows[-1].epsilon)} − ε = {format_eps(rows[0].epsilon)}: {rise.words(2)}"
    )
    wrong = holm_rejects([jump.p, rise.p])
    if jump.worse and rise.improved:
        status = "reproduced"
    elif (wrong[0] and _gain(jump) > 0) or (wrong[1] and _gain(rise) < 0):
        status = "contradicted"
    else:
        status = "inconclusive"
    return _settle(c, status, [jump, rise], rows[0].runs + rows[-1].runs, rows[0].flags + rows[-1].flags)


# ------------------------------------------------------------------------------------ (f): clipping


def claim_f(runs: list[Run], grid: GridConfig, model: str, config: VerdictConfig) -> Claim:
    margin = config.margins["test_accuracy"]
    rule = (
        "accuracy at the largest clipping bound C minus the main run's C at the sweep's ε, decided on the runs whose "
        "lr·C is held at the main run's (DP-SGD's step scales with lr·C; with lr fixed a larger C is also a larger "
        "step), both readings reported: reproduced when it is distinguishably lower and the large-C model is "
        "degenerate (collapsed); contradicted when it is shown not to be lower by more than the accuracy margin "
        f"({margin:g}) or is distinguishably higher; otherwise inconclusive"
    )
    c = Claim("f", "Accuracy collapses for large clipping bounds", "Fig. 6b", "inconclusive", "", rule)
    sweep = pick(runs, family="clip-sweep", model=model)
    main = pick(runs, family="gaussian", model=model, epsilon=grid.clip_sweep.epsilon)
    if not sweep or not main:
        c.reason = "not measured: the grid has no clipping sweep with its main run"
        return _settle(c, "inconclusive", [], [], [])
    top = max(r.spec.clip for r in sweep)
    readings = {held: pick(sweep, clip=top, held=held) for held in (True, False)}
    words = []
    for held, big in readings.items():
        if big:
            d = compare(big, main, ACCURACY)
            state = "degenerate" if all(r.degenerate for r in big) else "not degenerate"
            words.append(
                f"{'lr·C held' if held else 'lr fixed'}: accuracy(C = {format_eps(top)}) − accuracy(C = "
                f"{main[0].train.max_grad_norm:g}) {d.words()}, {state} "
                f"(accuracy {np.mean([r.train.test_accuracy for r in big]):.3f})"
            )
    decided = readings[True] or readings[False]
    d = compare(decided, main, ACCURACY)
    c.evidence = (
        f"at ε = {format_eps(grid.clip_sweep.epsilon)}: "
        + "; ".join(words)
        + ("" if readings[True] else " (no held reading in the grid: decided with lr fixed)")
    )
    if d.worse and all(r.degenerate for r in decided):
        status = "reproduced"
    elif d.noninferior(margin) or d.improved:
        status = "contradicted"
    else:
        status = "inconclusive"
    paired = [r for r in main if r.spec.seed in {x.spec.seed for x in decided}]
    return _settle(c, status, [d], decided + paired, flags(paired))


def claims(runs: list[Run], rows: list[EpsRow], grid: GridConfig, model: str, config: VerdictConfig) -> list[Claim]:
    return [
        *claims_a(rows),
        claim_b(runs, model),
        claim_c(runs, model, config),
        claim_c_low(runs, model),
        claim_d(runs, model),
        claim_e(rows),
        claim_f(runs, grid, model, config),
    ]
