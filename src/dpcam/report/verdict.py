"""The verdict: how much DP the model can afford, and the paper's claims checked on this data.

Everything here is a paired difference (:mod:`dpcam.report.compare`, :mod:`dpcam.report.paired`): a private
configuration against its reference on the same seeds and the same test images, with a 95 % interval that
covers training randomness (seeds) and test-image sampling, calibrated to cover at every ratio of the two.
Three kinds of statement are made from them (docs/verdict.md):

- table marks (▲/▼): a multiplicity correction over all cells of one table (``verdict.marks``);
- the answer ("from ε = X on, not worse"): a non-inferiority test of every headline measure at every
  ε from X on against a largest acceptable loss fixed before the study (``verdict.margins``);
- the paper's claims (:mod:`dpcam.report.claims`), each with its own rule and Holm's correction
  over the tests it combines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpcam.config import GridConfig, VerdictConfig
from dpcam.errors import UserError
from dpcam.families import pick
from dpcam.layout import format_eps
from dpcam.report.claims import Claim, claims
from dpcam.report.compare import (
    ACCURACY,
    BOTH_CORRECT,
    CONFIDENCE_KEY,
    HEADLINE,
    MATCHED,
    MEASURES,
    PAPER,
    SENSITIVITY_KEY,
    EpsRow,
    eps_rows,
)
from dpcam.report.paired import LEVEL, correct
from dpcam.report.runs import Run

# ------------------------------------------------------------------------------------ the answer


@dataclass
class Answer:
    """ "From ε = X on, not worse": non-inferiority of every key at every ε from X on (intersection-union: each
    test at 2.5 % one-sided, no correction needed for the conjunction)."""

    keys: tuple[str, ...]
    smallest: float | None  # X; None when even the largest ε fails
    # (ε, key) -> "shown" | "not shown" | "worse" (the whole interval beyond −margin: a larger loss is shown) |
    # "degenerate" | "not measured"
    cells: dict[tuple[float, str], str]
    # detectable loss > margin, and no loss shown by the interval itself
    underpowered: dict[tuple[float, str], bool] = field(default_factory=dict)

    def at(self, state: str) -> list[float]:
        """The ε at which some key is in ``state``."""
        return sorted({e for (e, _), s in self.cells.items() if s == state})


def answer(rows: list[EpsRow], keys: tuple[str, ...], margins: dict[str, float], alpha: float = 1 - LEVEL) -> Answer:
    """Each (ε, key) cell's state and the smallest ε from which every key is shown not worse, every test one-sided
    at α/2 (the 95 % interval's end by default)."""
    cells: dict[tuple[float, str], str] = {}
    underpowered: dict[tuple[float, str], bool] = {}
    for row in rows:
        for k in keys:
            d = row.diffs.get(k)
            if d is None or d.mean is None:
                cells[(row.epsilon, k)] = "not measured"
                continue
            # underpowered: the detectable loss exceeds the margin, and the interval does not itself show a loss
            underpowered[(row.epsilon, k)] = (d.detectable(alpha=alpha) or 0.0) > margins[k] and not d.worse
            if row.flags:
                cells[(row.epsilon, k)] = "degenerate"
            elif d.noninferior(margins[k], alpha):
                cells[(row.epsilon, k)] = "shown"
            elif (d.best_end(alpha) or 0.0) < -margins[k]:
                cells[(row.epsilon, k)] = "worse"
            else:
                cells[(row.epsilon, k)] = "not shown"
    smallest = None
    for row in sorted(rows, key=lambda r: -r.epsilon):
        if any(cells[(row.epsilon, k)] in ("not shown", "worse", "degenerate") for k in keys):
            break
        if any(cells[(row.epsilon, k)] == "shown" for k in keys):
            smallest = row.epsilon
    return Answer(keys, smallest, cells, underpowered)


# ------------------------------------------------------------------------------------ the verdict


@dataclass
class Verdict:
    model: str
    seeds: list[int]
    rows: list[EpsRow]
    explanations: Answer
    accuracy: Answer
    claims: list[Claim]
    config: VerdictConfig
    families: dict[str, int] = field(default_factory=dict)  # table -> how many cells its correction counted
    notes: list[str] = field(default_factory=list)
    tracks: list = field(default_factory=list)  # correlations(): what the paper's metrics track

    @property
    def explanations_from(self) -> float | None:
        return self.explanations.smallest

    @property
    def accuracy_from(self) -> float | None:
        return self.accuracy.smallest

    def problems(self) -> list[str]:
        """One line per comparison that could not be made (unpaired runs, unreadable per-image files)."""
        out = {d.problem for r in self.rows for d in r.diffs.values() if d.problem}
        return sorted(out | {p for c in self.claims for p in c.problems})


def verdict(runs: list[Run], grid: GridConfig, model: str, config: VerdictConfig | None = None) -> Verdict:
    """The verdict of one model of the grid (Gaussian DP-SGD against ε = ∞, and the paper's claims)."""
    config = config or VerdictConfig()
    rows = eps_rows(runs, "gaussian", model, {e: grid.schedule_of(e) for e in grid.gaussian})
    seeds = sorted({r.spec.seed for row in rows for r in row.runs})
    notes = []
    if len(seeds) < 2:
        notes.append(
            f"only {len(seeds)} seed: the intervals cover test-image sampling only, not training randomness; "
            "set grid.seeds to at least 3 values"
        )
    families = {
        "main": correct([r.diffs[m.key] for r in rows for m in MEASURES if m.key in r.diffs], config.marks),
        "matched": correct([r.diffs[k] for r in rows for k in MATCHED + BOTH_CORRECT if k in r.diffs], config.marks),
        "split": correct([d for r in rows for parts in r.split.values() for d in parts.values()], config.marks),
        "groups": correct([r.diffs[k] for r in rows for k in r.groups()], config.marks),
    }
    reference = pick(runs, family="baseline", scheme="none", model=model, schedule=None)
    return Verdict(
        model,
        seeds,
        rows,
        answer(rows, HEADLINE, config.margins),
        answer(rows, (ACCURACY.key,), config.margins),
        claims(runs, rows, grid, model, config),
        config,
        families,
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


# per ε in metrics.json: (measure, short name of its difference ε − ∞)
DVC_METRICS = ("test_accuracy", "d_acc"), ("masked_score_pct", "d_mscore")


def dvc_metrics(v: Verdict) -> dict[str, Any]:
    """metrics.json, the few numbers ``dvc metrics show`` / ``dvc exp show`` print as columns (≤ 40 for the
    default grid, short names; the README lists them): the model, its seeds, the smallest ε from which
    explanations / accuracy are not worse ("none": no ε tested is), every claim's status, and per ε of the grid's
    Gaussian family ``d_acc_e<ε>`` / ``d_mscore_e<ε>``: the paired difference ε − ∞ of test accuracy (a fraction)
    / masked score % (percentage points), mean over seeds, with its interval's ends ``_lo`` / ``_hi``. Every
    per-run number is in runs.csv and plots/."""
    out: dict[str, Any] = {
        "model": v.model,
        "seeds": len(v.seeds),
        "expl_ok_from_eps": "none" if v.explanations_from is None else v.explanations_from,  # DVC drops a null
        "acc_ok_from_eps": "none" if v.accuracy_from is None else v.accuracy_from,
    }
    out.update({f"claim_{c.key}": c.status for c in v.claims})
    for row in v.rows:
        for key, short in DVC_METRICS:
            d = row.diffs.get(key)
            if d is None or d.mean is None or not math.isfinite(d.mean):
                continue
            name = f"{short}_e{format_eps(row.epsilon)}"
            out.update({name: d.mean, f"{name}_lo": d.lo, f"{name}_hi": d.hi})
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
                try:
                    d = r.per_image
                except UserError:
                    continue
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
