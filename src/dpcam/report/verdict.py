"""The verdict: how much DP the model can afford, and the paper's claims checked on this data.

Everything here is a paired difference (:mod:`dpcam.report.paired`): a private configuration
against its reference on the same seeds and the same test images, with a 95 % interval that
covers training randomness (seeds) and test-image sampling (a paired bootstrap). A difference is
*distinguishable* when its interval excludes 0. The rules that turn the numbers into words are
stated with each claim (and in docs/metrics.md, "The verdict"). A comparison that involves a
degenerate or an undertrained run is inconclusive, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpcam.config import GridConfig
from dpcam.families import pick
from dpcam.layout import format_eps
from dpcam.report.paired import Difference, paired_mean, paired_statistic, quadratic_kappa
from dpcam.report.runs import Run


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    better: str  # "higher" | "lower"
    decimals: int = 3
    source: str = "explain"  # explain: per_image.npz; accuracy/qwk: predictions.npz


ACCURACY = Measure("test_accuracy", "test accuracy", "higher", 3, "accuracy")
QWK = Measure("test_qwk", "QWK", "higher", 3, "qwk")
EXPLANATION = (
    Measure("avg_drop_pct", "Average Drop %", "lower", 2),
    Measure("increase_conf_pct", "Increase in Confidence %", "higher", 2),
    Measure("masked_score_pct", "masked score %", "higher", 2),
    Measure("masked_accuracy_pct", "masked accuracy %", "higher", 2),
    Measure("deletion_auc", "deletion AUC", "lower"),
    Measure("insertion_auc", "insertion AUC", "higher"),
    Measure("pointing_game", "pointing game", "higher"),
    Measure("energy_pointing_game", "energy pointing game", "higher"),
)
AGREEMENT = Measure("map_agreement", "agreement with the ε = ∞ maps", "higher")
ROAD_GAP = Measure("road_gap", "ROAD gap (LeRF − MoRF)", "higher")
# the randomisation check (Adebayo et al. 2018): agreement with the maps of the same model with randomised
# weights; lower = the maps depend more on what the model learnt. Reported, like AGREEMENT, not counted as quality
RANDOMISATION = Measure("randomisation_agreement", "agreement with the weight-randomised model's maps", "lower")
PAPER = ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")  # Naidu et al.'s three metrics
ROAD = ("road_gap",)
LOCALISATION = ("pointing_game", "energy_pointing_game")
CONFIDENCE_KEY, SENSITIVITY_KEY = "confidence_y", "mask_sensitivity_pct"  # per image (explain's masking baselines)
CONFIDENCE_CALIPER, SENSITIVITY_CALIPER = 0.05, 5.0  # matched: |ΔY| ≤ 0.05, |ΔS| ≤ 5 points
RANDOM_MAP = {
    "avg_drop_pct": "avg_drop_random_pct",
    "increase_conf_pct": "increase_conf_random_pct",
    "masked_score_pct": "masked_score_random_pct",
}
LARGE_GAP = 0.05  # claim (b): a "large" accuracy gap is at least 5 percentage points


# ------------------------------------------------------------------------------------ paired comparisons


def _aligned(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``a`` and ``b`` of the dataset images both hold (their ``index`` arrays)."""
    _, ia, ib = np.intersect1d(a["index"], b["index"], return_indices=True)
    return ia, ib


def _by_seed(runs: list[Run], refs: list[Run]) -> list[tuple[Run, Run]]:
    ref = {r.spec.seed: r for r in refs}
    return [(r, ref[r.spec.seed]) for r in sorted(runs, key=lambda r: r.spec.seed) if r.spec.seed in ref]


def compare(runs: list[Run], refs: list[Run], m: Measure, match: tuple[str, float] | None = None) -> Difference:
    """``m`` of ``runs`` minus ``m`` of ``refs``, paired by seed and image; with ``match`` = (per-image key, caliper)
    only on the images where the two runs' values of that key differ by at most the caliper (matched images)."""
    pairs = _by_seed(runs, refs)
    if m.source == "explain":
        data = []
        for r, ref in pairs:
            a, b = r.per_image, ref.per_image
            if m.key not in a or m.key not in b or (match and (match[0] not in a or match[0] not in b)):
                continue
            ia, ib = _aligned(a, b)
            x, y = a[m.key][ia].astype(float), b[m.key][ib].astype(float)
            if match:
                far = ~(np.abs(a[match[0]][ia] - b[match[0]][ib]) <= match[1])
                x, y = np.where(far, np.nan, x), np.where(far, np.nan, y)
            data.append((x, y))
        if data and len({len(x) for x, _ in data}) > 1:
            n = min(len(x) for x, _ in data)
            data = [(x[:n], y[:n]) for x, y in data]
        return paired_mean(data, better=m.better)
    preds = []
    for r, ref in pairs:
        a, b = r.predictions, ref.predictions
        ia, ib = _aligned(a, b)
        preds.append((a["pred"][ia], b["pred"][ib], a["label"][ia]))
    if m.source == "accuracy":
        return paired_mean([((pa == y).astype(float), (pb == y).astype(float)) for pa, pb, y in preds], better=m.better)
    k = int(max(max(int(pa.max()), int(pb.max()), int(y.max())) for pa, pb, y in preds)) + 1 if preds else 2
    return paired_statistic(preds, lambda c: quadratic_kappa(c, k), k, better=m.better)


def flags(runs: list[Run]) -> list[str]:
    """Why a comparison involving ``runs`` is not to be trusted (degenerate / undertrained runs)."""
    out = [f"{r.spec.name} is degenerate" for r in runs if r.degenerate]
    return out + [f"{r.spec.name} is undertrained" for r in runs if r.undertrained]


# ------------------------------------------------------------------------------------ per ε


@dataclass
class EpsRow:
    """One ε of a family against ε = ∞: every measure's paired difference."""

    epsilon: float
    runs: list[Run]
    diffs: dict[str, Difference]
    flags: list[str]

    def worse(self, keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if k in self.diffs and self.diffs[k].worse]

    def better(self, keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if k in self.diffs and self.diffs[k].improved]


def eps_rows(runs: list[Run], family: str, model: str) -> list[EpsRow]:
    """Each ε of ``family`` (one model) against the non-private runs of the same seeds."""
    ref = pick(runs, family="baseline", scheme="none", model=model)
    mine = pick(runs, family=family, model=model)
    rows = []
    for eps in sorted({r.spec.epsilon for r in mine if r.spec.epsilon is not None}):
        at = pick(mine, epsilon=eps)
        used = [r for r, _ in _by_seed(at, ref)] + [x for _, x in _by_seed(at, ref)]
        diffs = {m.key: compare(at, ref, m) for m in (ACCURACY, QWK, *EXPLANATION, ROAD_GAP, AGREEMENT, RANDOMISATION)}
        for m in EXPLANATION:
            if m.key in PAPER:
                for key, caliper in ((CONFIDENCE_KEY, CONFIDENCE_CALIPER), (SENSITIVITY_KEY, SENSITIVITY_CALIPER)):
                    diffs[f"{m.key}|{key}"] = compare(at, ref, m, (key, caliper))
        rows.append(EpsRow(eps, at, diffs, flags(used)))
    return rows


QUALITY = tuple(m.key for m in EXPLANATION)


def smallest_eps(rows: list[EpsRow], keys: tuple[str, ...]) -> float | None:
    """The smallest ε from which on (it and every larger ε of the grid) no measure in ``keys`` is
    distinguishably worse than ε = ∞; None when even the largest ε is."""
    found = None
    for row in sorted(rows, key=lambda r: -r.epsilon):
        if row.worse(keys):
            break
        found = row.epsilon
    return found


# ------------------------------------------------------------------------------------ the claims


@dataclass
class Claim:
    key: str
    statement: str
    source: str
    status: str  # reproduced | contradicted | inconclusive
    evidence: str
    rule: str


def _inconclusive_if_flagged(claim: Claim, why: list[str]) -> Claim:
    if why and claim.status != "inconclusive":
        claim.evidence += f" — but {'; '.join(why[:3])}" + (f" (and {len(why) - 3} more)" if len(why) > 3 else "")
        claim.status = "inconclusive"
    return claim


def _label(key: str) -> Measure:
    """The measure of a key, matched keys (``metric|match``) included."""
    base, _, match = key.partition("|")
    m = {m.key: m for m in (*EXPLANATION, ROAD_GAP, AGREEMENT, RANDOMISATION, ACCURACY, QWK)}[base]
    return Measure(key, f"{m.label} ({match.split('_')[0]}-matched)" if match else m.label, m.better, m.decimals)


def _metrics_words(row: EpsRow, keys: tuple[str, ...]) -> str:
    labels = {k: _label(k) for k in keys}
    return "; ".join(f"{labels[k].label} {row.diffs[k].words(labels[k].decimals)}" for k in keys if k in row.diffs)


def _trend(rows: list[EpsRow], keys: tuple[str, ...], need: int) -> tuple[str, str]:
    """(status, evidence) of "quality improves with ε, best at ∞" on ``keys``: reproduced when at the smallest ε at
    least ``need`` of them are distinguishably worse than ∞ and no ε is distinguishably better on any; contradicted
    when some ε is distinguishably better on at least ``need``."""
    present = tuple(k for k in keys if any(k in r.diffs and r.diffs[k].mean is not None for r in rows))
    if not rows or not present:
        return "inconclusive", "not measured"
    low = rows[0]
    better_at = [r for r in rows if len(r.better(present)) >= min(need, len(present))]
    if better_at:
        r = better_at[0]
        return "contradicted", f"ε = {format_eps(r.epsilon)} − ∞: {_metrics_words(r, present)} (better than ∞)"
    words = f"ε = {format_eps(low.epsilon)} − ∞: {_metrics_words(low, present)}"
    if len(low.worse(present)) >= min(need, len(present)) and not any(r.better(present) for r in rows):
        return "reproduced", words
    return "inconclusive", words


def _trend_claim(rows: list[EpsRow], key: str, statement: str, source: str, rule: str, keys, need: int) -> Claim:
    """A claim decided by :func:`_trend` on ``keys`` (inconclusive when a run involved is flagged)."""
    status, evidence = _trend(rows, keys, need)
    return _inconclusive_if_flagged(
        Claim(key, statement, source, status, evidence, rule), [f for r in rows for f in r.flags]
    )


def claim_a(rows: list[EpsRow]) -> Claim:
    rule = (
        "on the paper's 3 metrics (Average Drop, Increase in Confidence, masked score): reproduced when at the "
        "smallest ε at least 2 are distinguishably worse than ε = ∞ and no ε is distinguishably better on any; "
        "contradicted when some ε is distinguishably better than ∞ on at least 2"
    )
    statement = "Explanation quality improves with ε, best at ε = ∞ — on the paper's metrics"
    return _trend_claim(rows, "a", statement, "Table 1, Fig. 2, 5", rule, PAPER, 2)


def claim_a_matched(rows: list[EpsRow]) -> Claim:
    rule = (
        "the same rule on images where the private and the non-private model are equally confident "
        f"(|ΔY| ≤ {CONFIDENCE_CALIPER:g}) and, separately, equally sensitive to masking with a uniform map of the same "
        f"mass (|ΔS| ≤ {SENSITIVITY_CALIPER:g} points): reproduced when it holds on both, contradicted when "
        "contradicted on either"
    )
    c = Claim(
        "a_matched",
        "… on the matched metrics (confidence- and masking-sensitivity-matched images)",
        "Table 1",
        "inconclusive",
        "",
        rule,
    )
    conf = _trend(rows, tuple(f"{k}|{CONFIDENCE_KEY}" for k in PAPER), 2)
    sens = _trend(rows, tuple(f"{k}|{SENSITIVITY_KEY}" for k in PAPER), 2)
    c.evidence = f"confidence-matched {conf[1]}; sensitivity-matched {sens[1]}"
    if "contradicted" in (conf[0], sens[0]):
        c.status = "contradicted"
    elif conf[0] == sens[0] == "reproduced":
        c.status = "reproduced"
    return _inconclusive_if_flagged(c, [f for r in rows for f in r.flags])


def claim_a_road(rows: list[EpsRow]) -> Claim:
    rule = (
        "on ROAD (remove and debias, Rong et al. 2022; LeRF − MoRF gap, higher is better): reproduced when the "
        "smallest ε's gap is distinguishably below ∞'s and no ε's is distinguishably above; contradicted when some "
        "ε's is distinguishably above"
    )
    return _trend_claim(rows, "a_road", "… on ROAD (imputation instead of black masking)", "—", rule, ROAD, 1)


def claim_a_localisation(rows: list[EpsRow]) -> Claim:
    rule = (
        "on evidence that needs no masking (pointing game and energy pointing game on the lesion masks): "
        "reproduced when at the smallest ε at least one is distinguishably worse than ∞ and no ε is distinguishably "
        "better on either; contradicted when some ε is distinguishably better on one"
    )
    statement = "… on localisation (lesion masks; no masking of the input)"
    return _trend_claim(rows, "a_localisation", statement, "—", rule, LOCALISATION, 1)


def claim_b(runs: list[Run], model: str) -> Claim:
    rule = (
        f"reproduced when test accuracy at ε = 5 exceeds ε = 1 (same seeds and images) by at least "
        f"{100 * LARGE_GAP:g} points with an interval above 0; contradicted when the interval lies below "
        f"{100 * LARGE_GAP:g} points"
    )
    c = Claim("b", "A large accuracy gap between ε = 1 and ε = 5", "Fig. 3", "inconclusive", "", rule)
    g = pick(runs, family="gaussian", model=model)
    one, five = pick(g, epsilon=1), pick(g, epsilon=5)
    if not one or not five:
        c.evidence = "the grid has no Gaussian runs at ε = 1 and 5"
        return c
    d = compare(five, one, ACCURACY)
    c.evidence = f"accuracy(ε = 5) − accuracy(ε = 1) = {d.words()} over {d.seeds} seeds"
    if d.mean is not None and d.lo is not None:
        if d.lo > 0 and d.mean >= LARGE_GAP:
            c.status = "reproduced"
        elif d.hi < LARGE_GAP:
            c.status = "contradicted"
    return _inconclusive_if_flagged(c, flags(one + five))


def _scheme_pairs(lap: list[Run], gau: list[Run]) -> tuple[list[str], bool, list[Run]]:
    """Laplace − Gaussian on the paper's three metrics at each ε both have: words, any distinguishable, runs used."""
    words, differ, used = [], False, []
    for e in sorted({r.spec.epsilon for r in lap} & {r.spec.epsilon for r in gau}):
        a, b = pick(lap, epsilon=e), pick(gau, epsilon=e)
        used += a + b
        ds = {m.label: compare(a, b, m) for m in EXPLANATION if m.key in PAPER}
        differ |= any(d.distinguishable for d in ds.values())
        words.append(f"ε = {format_eps(e)}: " + ", ".join(f"{k} {d.words(2)}" for k, d in ds.items()))
    return words, differ, used


def claim_c(runs: list[Run], model: str) -> Claim:
    """Table 2. Tested on the valid pair that learns: Laplace and Gaussian DP fine-tuning of the same public trunk
    (finetune-laplace vs finetune-gaussian) when the grid has it, else the from-scratch families. The paper's
    replica (laplace-paper, no guarantee) is reported beside it and never decides the claim."""
    rule = (
        "reproduced when at every ε both schemes share, none of the paper's 3 metrics differs distinguishably "
        "between valid Laplace and Gaussian DP (fine-tuned on one public trunk when the grid has it, else from "
        "scratch), and the ε = 0.5 Gaussian model is degenerate (too private to learn); contradicted when a paper "
        "metric differs distinguishably, or the ε = 0.5 model learns. laplace-paper (NO guarantee) is reported, "
        "never counted"
    )
    c = Claim(
        "c",
        "Laplace DP-SGD explains about as well as Gaussian at equal ε; ε = 0.5 is too private to learn",
        "Table 2",
        "inconclusive",
        "",
        rule,
    )
    fam = "finetune-" if pick(runs, family="finetune-laplace", model=model) else ""
    lap = pick(runs, family=f"{fam}laplace", model=model)
    gau = pick(runs, family=f"{fam}gaussian", model=model)
    words, differ, used = _scheme_pairs(lap, gau)
    if not words:
        c.evidence = "the grid has no Laplace and Gaussian runs at a shared ε"
        return c
    low = pick(runs, family="gaussian", model=model, epsilon=0.5)
    learns = bool(low) and not any(r.degenerate for r in low)
    how = "fine-tuned on the public trunk" if fam else "from scratch"
    c.evidence = f"valid Laplace − Gaussian, both {how}: " + "; ".join(words)
    if low:
        c.evidence += (
            f"; ε = 0.5 Gaussian {'learns' if learns else 'is degenerate'} "
            f"(accuracy {np.mean([r.train.test_accuracy for r in low]):.3f})"
        )
    paper, _, paper_runs = _scheme_pairs(
        pick(runs, family="laplace-paper", model=model), pick(runs, family="gaussian", model=model)
    )
    if paper:
        bad = flags(paper_runs)
        c.evidence += (
            " [not counted: the paper's replica laplace-paper (NO guarantee) − Gaussian, both from scratch, "
            + "; ".join(paper)
            + (f" ({'; '.join(bad[:2])})" if bad else "")
            + "]"
        )
    if differ or learns:
        c.status = "contradicted"
    elif low:
        c.status = "reproduced"
    why = flags(used)
    if why:
        c.status, c.evidence = "inconclusive", c.evidence + f" — but {'; '.join(why[:3])}"
    return c


def claim_d(runs: list[Run], model: str) -> Claim:
    rule = (
        "reproduced when the model trained on the most private local-DP images is distinguishably worse than "
        "the non-private model on at least 2 of the paper's 3 metrics; contradicted when it is distinguishably "
        "better on at least 2"
    )
    c = Claim("d", "Local-DP explanations degrade as ε falls", "Fig. 2, 4", "inconclusive", "", rule)
    ldp = [r for r in pick(runs, family="ldp", model=model) if r.spec.epsilon is not None]
    ref = pick(runs, family="baseline", scheme="none", model=model)
    if not ldp or not ref:
        c.evidence = "the grid has no local-DP runs"
        return c
    mech = (
        "singh-sikka" if any(r.spec.ldp.startswith("singh-sikka") for r in ldp) else ldp[0].spec.ldp.rsplit("-eps")[0]
    )
    own = [r for r in ldp if r.spec.ldp.startswith(mech)]
    low = pick(own, epsilon=min(r.spec.epsilon for r in own))
    row = EpsRow(low[0].spec.epsilon, low, {m.key: compare(low, ref, m) for m in EXPLANATION if m.key in PAPER}, [])
    c.evidence = f"{mech} ε = {format_eps(row.epsilon)} − ∞: {_metrics_words(row, PAPER)}"
    if len(row.worse(PAPER)) >= 2:
        c.status = "reproduced"
    elif len(row.better(PAPER)) >= 2:
        c.status = "contradicted"
    return _inconclusive_if_flagged(c, flags(low + [r for r, _ in _by_seed(ref, low)]))


def claim_e(rows: list[EpsRow]) -> Claim:
    rule = (
        "reproduced when the masked score at ε = ∞ is distinguishably above the largest ε's (the jump) and the "
        "largest ε's is distinguishably above the smallest ε's (the rise); contradicted when either is "
        "distinguishably the other way"
    )
    c = Claim("e", "The masked score rises with ε and jumps from ε = 10 to ∞", "Fig. 6a", "inconclusive", "", rule)
    if len(rows) < 2:
        c.evidence = "fewer than two Gaussian ε"
        return c
    key = "masked_score_pct"
    jump = rows[-1].diffs[key]
    rise = compare(rows[-1].runs, rows[0].runs, EXPLANATION[2])
    c.evidence = (
        f"masked score % ε = {format_eps(rows[-1].epsilon)} − ∞: {jump.words(2)}; "
        f"ε = {format_eps(rows[-1].epsilon)} − ε = {format_eps(rows[0].epsilon)}: {rise.words(2)}"
    )
    if jump.worse and rise.improved:
        c.status = "reproduced"
    elif jump.improved or rise.worse:
        c.status = "contradicted"
    return _inconclusive_if_flagged(c, rows[0].flags + rows[-1].flags)


def claim_f(runs: list[Run], grid: GridConfig, model: str) -> Claim:
    rule = (
        "reproduced when accuracy at the largest clipping bound C is distinguishably below the main run's C and "
        "the model is degenerate (collapsed); contradicted when it is not distinguishably lower"
    )
    c = Claim("f", "Accuracy collapses for large clipping bounds", "Fig. 6b", "inconclusive", "", rule)
    sweep = pick(runs, family="clip-sweep", model=model)
    main = pick(runs, family="gaussian", model=model, epsilon=grid.clip_sweep.epsilon)
    if not sweep or not main:
        c.evidence = "the grid has no clipping sweep with its main run"
        return c
    big = pick(sweep, clip=max(r.spec.clip for r in sweep))
    d = compare(big, main, ACCURACY)
    collapsed = all(r.degenerate for r in big)
    c.evidence = (
        f"accuracy(C = {format_eps(big[0].spec.clip)}) − accuracy(C = {main[0].train.max_grad_norm:g}) at "
        f"ε = {format_eps(grid.clip_sweep.epsilon)}: {d.words()}; C = {format_eps(big[0].spec.clip)} "
        f"{'degenerate' if collapsed else 'not degenerate'} "
        f"(accuracy {np.mean([r.train.test_accuracy for r in big]):.3f})"
    )
    if d.worse and collapsed:
        c.status = "reproduced"
    elif d.mean is not None and not d.worse:
        c.status = "contradicted"
    return c


# ------------------------------------------------------------------------------------ the verdict


@dataclass
class Verdict:
    model: str
    seeds: list[int]
    rows: list[EpsRow]
    explanations_from: float | None
    accuracy_from: float | None
    claims: list[Claim]
    notes: list[str] = field(default_factory=list)
    tracks: list = field(default_factory=list)  # correlations(): what the paper's metrics track


def verdict(runs: list[Run], grid: GridConfig, model: str) -> Verdict:
    """The verdict of one model of the grid (Gaussian DP-SGD against ε = ∞, and claims (a)–(f))."""
    rows = eps_rows(runs, "gaussian", model)
    seeds = sorted({r.spec.seed for row in rows for r in row.runs})
    notes = []
    if len(seeds) < 2:
        notes.append(
            f"only {len(seeds)} seed: the intervals cover test-image sampling only, not training randomness; "
            "set grid.seeds to at least 3 values"
        )
    claims = [
        claim_a(rows),
        claim_a_matched(rows),
        claim_a_road(rows),
        claim_a_localisation(rows),
        claim_b(runs, model),
        claim_c(runs, model),
        claim_d(runs, model),
        claim_e(rows),
        claim_f(runs, grid, model),
    ]
    reference = pick(runs, family="baseline", scheme="none", model=model)
    return Verdict(
        model,
        seeds,
        rows,
        smallest_eps(rows, QUALITY),
        smallest_eps(rows, ("test_accuracy",)),
        claims,
        notes,
        correlations(rows, reference),
    )


def summary(v: Verdict) -> dict[str, Any]:
    """The verdict's numbers for metrics.json / MLflow (finite numbers only; ε as numbers, null = none)."""
    out: dict[str, Any] = {
        "smallest_eps_explanations_not_worse": v.explanations_from,
        "smallest_eps_accuracy_not_worse": v.accuracy_from,
        "claims": {c.key: c.status for c in v.claims},
        "seeds": len(v.seeds),
    }
    for row in v.rows:
        for key, d in row.diffs.items():
            if d.mean is not None and math.isfinite(d.mean):
                out[f"delta_{key.replace('|', '__matched_')}_eps{format_eps(row.epsilon)}"] = d.mean
    return out


# ------------------------------------------------------------------------------------ what the metrics track


def correlations(rows: list[EpsRow], reference: list[Run]) -> list[tuple[str, dict[str, tuple[float, float]]]]:
    """Per configuration (∞ first, then each ε): for each paper metric, the mean over seeds of its per-image
    Spearman correlation with the model's confidence Y and with its sensitivity to masking S."""
    from scipy.stats import spearmanr

    def of(runs: list[Run]) -> dict[str, tuple[float, float]]:
        out = {}
        for key in PAPER:
            rho_y, rho_s = [], []
            for r in runs:
                d = r.per_image
                if key not in d or CONFIDENCE_KEY not in d or SENSITIVITY_KEY not in d:
                    continue
                for cov, acc in ((CONFIDENCE_KEY, rho_y), (SENSITIVITY_KEY, rho_s)):
                    ok = np.isfinite(d[key]) & np.isfinite(d[cov])
                    if ok.sum() > 2 and np.ptp(d[key][ok]) > 0 and np.ptp(d[cov][ok]) > 0:
                        acc.append(float(spearmanr(d[key][ok], d[cov][ok]).statistic))
            if rho_y and rho_s:
                out[key] = (float(np.mean(rho_y)), float(np.mean(rho_s)))
        return out

    return [("ε = ∞", of(reference))] + [(f"ε = {format_eps(r.epsilon)}", of(r.runs)) for r in rows]
