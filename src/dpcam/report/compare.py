"""Paired comparisons of grid runs: the verdict's measures, each ε of a family against ε = ∞.

:func:`compare` pairs two sets of runs by seed and by the dataset images both scored, and returns a
:class:`~dpcam.report.paired.Difference` (mean and an interval that covers seeds and images); a run
without a partner seed or with an unreadable per-image file leaves a ``problem`` naming it, never a
shorter array. :func:`eps_rows` makes one :class:`EpsRow` per ε of a family with every measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpcam.errors import UserError
from dpcam.families import pick
from dpcam.records import calibration_error, calibration_features
from dpcam.report.paired import (
    Difference,
    paired_mean,
    paired_statistic,
    paired_sums,
    quadratic_kappa,
)
from dpcam.report.runs import Run


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    better: str  # "higher" | "lower"
    decimals: int = 3
    source: str = "explain"  # explain: per_image.npz; accuracy/qwk/ece/recall: predictions.npz


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
# weights; lower = the maps depend more on what the model learnt
RANDOMISATION = Measure("randomisation_agreement", "agreement with the weight-randomised model's maps", "lower")
MEASURES = (ACCURACY, QWK, *EXPLANATION, ROAD_GAP, AGREEMENT, RANDOMISATION)
PAPER = ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")  # Naidu et al.'s three metrics
ROAD = ("road_gap",)
LOCALISATION = ("pointing_game", "energy_pointing_game")
# the explanation rows the answer ("from ε = X on, explanations are not worse") tests: every explanation row but
# agreement with the ε = ∞ maps, which is similarity to one reference model, not quality (EXCLUDED says why)
HEADLINE = (*(m.key for m in EXPLANATION), ROAD_GAP.key, RANDOMISATION.key)
EXCLUDED = {AGREEMENT.key: "similarity to one reference model's maps, not explanation quality"}
CONFIDENCE_KEY, SENSITIVITY_KEY = "confidence_y", "mask_sensitivity_pct"  # per image (explain's masking baselines)
CONFIDENCE_CALIPER, SENSITIVITY_CALIPER = 0.05, 5.0  # matched: |ΔY| ≤ 0.05, |ΔS| ≤ 5 points
MATCHES = ((CONFIDENCE_KEY, CONFIDENCE_CALIPER), (SENSITIVITY_KEY, SENSITIVITY_CALIPER))


ECE = Measure("test_ece", "expected calibration error", "lower", 3, "ece")


def recall(c: int) -> Measure:
    """Class ``c``'s recall: accuracy on the test images of that class (disparate impact: Bagdasaryan et al. 2019)."""
    return Measure(f"recall_{c}", f"class {c} recall", "higher", 3, "recall")


def label(key: str) -> Measure:
    """The measure of a key, matched keys (``metric|match``) and per-class recalls (``recall_<c>``) included."""
    base, _, match = key.partition("|")
    if base.startswith("recall_"):
        return recall(int(base.removeprefix("recall_")))
    m = {m.key: m for m in (*MEASURES, ECE)}[base]
    words = f"{m.label} ({match.split('_')[0]}-matched)" if match else m.label
    if match == CORRECT_KEY:
        words = f"{m.label} (both correct)"
    return Measure(key, words, m.better, m.decimals, m.source)


MATCHED = tuple(f"{k}|{match}" for match, _ in MATCHES for k in PAPER)
# the paper's metrics on the images both models classify correctly: a wrong answer's map is not the model's
# explanation of the right class (the matched table shows them; claim (a_matched) reads only MATCHED)
CORRECT_KEY = "correct"
BOTH_CORRECT = tuple(f"{k}|{CORRECT_KEY}" for k in PAPER)


# ------------------------------------------------------------------------------------ paired comparisons


def _by_seed(runs: list[Run], refs: list[Run]) -> tuple[list[tuple[Run, Run]], list[str]]:
    """(run, reference) pairs of the same seed, and one line per run of ``runs`` whose seed has no reference run
    (a reference seed the compared family does not train, e.g. a one-seed family against three, is simply unused)."""
    ref = {r.spec.seed: r for r in refs}
    pairs = [(r, ref[r.spec.seed]) for r in sorted(runs, key=lambda r: r.spec.seed) if r.spec.seed in ref]
    lonely = [
        f"{r.spec.name} has no partner of seed {r.spec.seed} among {', '.join(sorted(x.spec.name for x in refs))}"
        for r in runs
        if r.spec.seed not in ref
    ]
    return pairs, lonely


def _read(run: Run, what: str) -> dict[str, np.ndarray]:
    return run.per_image if what == "per_image" else run.predictions


def _common(arrays: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The dataset indices every array set holds (so all seeds pair the same images)."""
    common = arrays[0]["index"]
    for a in arrays[1:]:
        common = np.intersect1d(common, a["index"])
    return common


def _at(a: dict[str, np.ndarray], key: str, idx: np.ndarray) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(a["index"])}
    return np.asarray(a[key])[[pos[int(i)] for i in idx]]


def compare(runs: list[Run], refs: list[Run], m: Measure, match: tuple[str, float] | None = None) -> Difference:
    """``m`` of ``runs`` minus ``m`` of ``refs``, paired by seed and by image (the dataset images every run of
    both sides scored); with ``match`` = (per-image key, caliper) only on the images where the two runs' values
    of that key differ by at most the caliper. A run without a partner seed, or whose per-image file is missing
    or unreadable, leaves the difference with a ``problem`` that names it."""
    pairs, lonely = _by_seed(runs, refs)
    if lonely:
        return _problem(m, "; ".join(lonely))
    what = "per_image" if m.source == "explain" else "predictions"
    correct = match is not None and match[0] == CORRECT_KEY
    try:
        arrays = [(_read(r, what), _read(ref, what)) for r, ref in pairs]
        preds = [(r.predictions, ref.predictions) for r, ref in pairs] if correct else []
    except UserError as e:
        return _problem(m, str(e))
    if not arrays:
        return Difference(None, None, None, 0, 0, better=m.better, note="no paired runs")
    if m.source == "explain":
        keys = [m.key] + ([match[0]] if match and not correct else [])
        if any(k not in a or k not in b for a, b in arrays for k in keys):
            return Difference(None, None, None, len(arrays), 0, better=m.better, note="not measured")
    idx = _common([x for pair in arrays for x in pair])
    if idx.size == 0:
        return _problem(m, "the paired runs scored no image in common")
    if m.source == "explain":
        data = []
        for i, (a, b) in enumerate(arrays):
            x, y = _at(a, m.key, idx).astype(float), _at(b, m.key, idx).astype(float)
            if correct:
                (pa, pb) = preds[i]
                both = (_at(pa, "pred", idx) == _at(pa, "label", idx)) & (_at(pb, "pred", idx) == _at(pb, "label", idx))
                x, y = np.where(both, x, np.nan), np.where(both, y, np.nan)
            elif match:
                far = ~(np.abs(_at(a, match[0], idx) - _at(b, match[0], idx)) <= match[1])
                x, y = np.where(far, np.nan, x), np.where(far, np.nan, y)
            data.append((x, y))
        return paired_mean(data, better=m.better)
    preds = [(_at(a, "pred", idx), _at(b, "pred", idx), _at(a, "label", idx)) for a, b in arrays]
    if m.source == "accuracy":
        return paired_mean([((pa == y).astype(float), (pb == y).astype(float)) for pa, pb, y in preds], better=m.better)
    if m.source == "recall":
        c = int(m.key.removeprefix("recall_"))
        hits = [(np.where(y == c, pa == y, np.nan), np.where(y == c, pb == y, np.nan)) for pa, pb, y in preds]
        return paired_mean(hits, better=m.better)
    if m.source == "ece":
        if any("prob" not in a or "prob" not in b for a, b in arrays):
            return Difference(None, None, None, len(arrays), 0, better=m.better, note="not measured")
        y = _at(arrays[0][0], "label", idx)
        feats = [
            (
                calibration_features(_at(a, "prob", idx), y),
                calibration_features(_at(b, "prob", idx), y),
            )
            for a, b in arrays
        ]
        return paired_sums(feats, calibration_error, better=m.better)
    k = int(max(max(int(pa.max()), int(pb.max()), int(y.max())) for pa, pb, y in preds)) + 1
    return paired_statistic(preds, lambda c: quadratic_kappa(c, k), k, better=m.better)


def _problem(m: Measure, why: str) -> Difference:
    return Difference(None, None, None, 0, 0, better=m.better, note=why, problem=why)


def flags(runs: list[Run]) -> list[str]:
    """Why a comparison involving ``runs`` is not to be trusted (degenerate / undertrained runs)."""
    out = [f"{r.spec.name} is degenerate" for r in runs if r.degenerate]
    return out + [f"{r.spec.name} is undertrained" for r in runs if r.undertrained]


# ------------------------------------------------------------------------------------ per ε


def group_keys(refs: list[Run]) -> list[str]:
    """The keys of the per-group table: the calibration error, then one recall per class of the reference's test
    labels (none when its predictions cannot be read: the main table names that problem)."""
    try:
        classes = sorted({int(c) for r in refs for c in np.unique(r.predictions["label"])})
    except (UserError, KeyError):
        return []
    return [ECE.key] + [recall(c).key for c in classes] if classes else []


PARTS = ("budget", "clipping", "noise")  # the gap ε − ∞, split (docs/verdict.md, "What privacy costs")
SPLIT = (ACCURACY.key, *HEADLINE)


@dataclass
class EpsRow:
    """One ε of a family against ε = ∞: every measure's paired difference; with a DP schedule, the difference split
    into its parts (``split[measure][part]``) and the schedule's name."""

    epsilon: float
    runs: list[Run]
    diffs: dict[str, Difference]
    flags: list[str]
    schedule: str | None = None
    split: dict[str, dict[str, Difference]] = field(default_factory=dict)

    def worse(self, keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if k in self.diffs and self.diffs[k].worse]

    def better(self, keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if k in self.diffs and self.diffs[k].improved]

    def groups(self) -> list[str]:
        """The keys of the per-group table this row holds: calibration error and per-class recalls."""
        return [k for k in self.diffs if k == ECE.key or k.startswith("recall_")]


def references(runs: list[Run], model: str, schedule: str | None) -> tuple[list[Run], list[Run]]:
    """The ε = ∞ and clip-only runs trained with ``schedule``'s recipe (the baseline family's references)."""
    base = pick(runs, family="baseline", model=model, schedule=schedule)
    return pick(base, scheme="none"), pick(base, scheme="clip-only")


def split(at: list[Run], runs: list[Run], model: str, schedule: str | None) -> dict[str, dict[str, Difference]]:
    """ε − ∞ (tuned) = noise (ε − clip-only) + clipping (clip-only − ∞) + budget (∞ − ∞ tuned), the references
    trained with the ε's schedule, each a paired difference; {} without the schedule's references."""
    none_s, clip_s = references(runs, model, schedule)
    tuned = pick(runs, family="baseline", scheme="none", model=model, schedule=None)
    if schedule is None or not none_s or not clip_s or not tuned:
        return {}
    sides = {"budget": (none_s, tuned), "clipping": (clip_s, none_s), "noise": (at, clip_s)}
    return {key: {part: compare(*sides[part], label(key)) for part in PARTS} for key in SPLIT}


def eps_rows(runs: list[Run], family: str, model: str, schedules: dict[float, str] | None = None) -> list[EpsRow]:
    """Each ε of ``family`` (one model) against the non-private runs of the same seeds; ``schedules`` maps an ε to the
    DP schedule that trains it (grid.schedules), whose references split the difference."""
    ref = pick(runs, family="baseline", scheme="none", model=model, schedule=None)
    mine = pick(runs, family=family, model=model)
    rows = []
    for eps in sorted({r.spec.epsilon for r in mine if r.spec.epsilon is not None}):
        at = pick(mine, epsilon=eps)
        pairs, _ = _by_seed(at, ref)
        used = [r for r, _ in pairs] + [x for _, x in pairs]
        diffs = {m.key: compare(at, ref, m) for m in MEASURES}
        for key in group_keys(ref):
            diffs[key] = compare(at, ref, label(key))
        for key in MATCHED:
            base, _, match = key.partition("|")
            diffs[key] = compare(at, ref, label(base), (match, dict(MATCHES)[match]))
        for key in BOTH_CORRECT:
            diffs[key] = compare(at, ref, label(key.partition("|")[0]), (CORRECT_KEY, 0.0))
        sched = (schedules or {}).get(eps)
        rows.append(EpsRow(eps, at, diffs, flags(used), sched, split(at, runs, model, sched)))
    return rows
