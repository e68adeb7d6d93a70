"""Every claim rule at its boundaries: reproduced, contradicted, inconclusive, one seed, degenerate (issue 20)."""

import numpy as np
import pytest

from dpcam.config import GridConfig, VerdictConfig
from dpcam.report import claims as C
from dpcam.report.compare import HEADLINE, compare, eps_rows, label
from dpcam.report.verdict import answer
from tests.report.synthetic import DIFFICULTY, gaussian, make, reference

CONFIG = VerdictConfig()
GRID = GridConfig(seeds=[0, 1, 2])


def rows_of(*configs, seeds=(0, 1, 2), ref_kw=None):
    """Gaussian rows against a reference; ``configs`` = (ε, quality) or (ε, quality, kwargs)."""
    runs = reference(seeds, **(ref_kw or {}))
    for c in configs:
        runs += gaussian(c[0], seeds, quality=c[1], **(c[2] if len(c) > 2 else {}))
    return runs, eps_rows(runs, "gaussian", "smallcnn")


# --------------------------------------------------------------------------------- (a) and its three readings

READINGS = [lambda rows, i=i: C.claims_a(rows)[i] for i in range(4)]  # (a) and its matched, ROAD, localisation readings


@pytest.mark.parametrize("claim", READINGS)
def test_a_trend_reproduced_when_the_smallest_eps_is_worse_and_the_largest_better_than_it(claim):
    _, rows = rows_of((1, -10), (10, -3))
    assert claim(rows).status == "reproduced"


@pytest.mark.parametrize("claim", READINGS)
def test_a_one_cell_is_no_trend(claim):
    """The smallest ε is worse than ∞ but the largest is no better than it: not a rise with ε."""
    _, rows = rows_of((1, -10), (10, -11))
    assert claim(rows).verdict == "inconclusive"


@pytest.mark.parametrize("claim", READINGS)
def test_a_contradicted_when_a_private_model_is_better_than_infinity(claim):
    _, rows = rows_of((1, -10), (10, +8))
    c = claim(rows)
    assert c.status == "contradicted" and "better than ∞" in c.evidence


@pytest.mark.parametrize("claim", READINGS)
def test_a_not_distinguishable_is_inconclusive_never_contradicted(claim):
    _, rows = rows_of((1, 0.3, {"seed_sd": 3.0}), (10, 0.3, {"seed_sd": 3.0}))
    assert claim(rows).verdict == "inconclusive"


@pytest.mark.parametrize("claim", READINGS)
def test_a_on_one_seed_is_inconclusive_one_seed(claim):
    _, rows = rows_of((1, -10), (10, -3), seeds=(0,))
    c = claim(rows)
    assert c.verdict == "inconclusive (one seed)" and "seed 0 only" in c.basis


@pytest.mark.parametrize("claim", READINGS)
def test_a_with_a_degenerate_model_is_inconclusive_naming_it(claim):
    _, rows = rows_of((1, -10, {"degenerate": True}), (10, -3))
    c = claim(rows)
    assert c.status == "inconclusive" and "gaussian-eps1-smallcnn-s0 is degenerate" in c.reason


def test_a_states_its_seeds_and_what_its_interval_covers():
    _, rows = rows_of((1, -10), (10, -3))
    assert C.claims_a(rows)[0].basis == "seeds 0, 1, 2: intervals cover training seeds and test images"


def test_a_matched_prints_the_images_it_rests_on():
    _, rows = rows_of((1, -10), (10, -3))
    assert "confidence-matched 200 images per seed at ε = 1" in C.claims_a(rows)[1].evidence


# --------------------------------------------------------------------------------- (b)


def _b(acc1, acc5, seeds=(0, 1, 2), **kw):
    return C.claim_b(gaussian(1, seeds, accuracy=acc1, **kw) + gaussian(5, seeds, accuracy=acc5, **kw), "smallcnn")


def test_b_reproduced_only_when_the_gap_is_shown_to_exceed_five_points():
    assert _b(0.55, 0.80).status == "reproduced"
    assert _b(0.60, 0.66).verdict == "inconclusive"  # 6 points, but the interval reaches below 5
    assert _b(0.60, 0.61, seed_sd=0.0).status == "contradicted"  # shown below 5 points
    assert _b(0.55, 0.80, seeds=(0,)).verdict == "inconclusive (one seed)"
    c = C.claim_b(gaussian(1, accuracy=0.55, degenerate=True) + gaussian(5, accuracy=0.8), "smallcnn")
    assert c.status == "inconclusive" and "degenerate" in c.reason


def test_b_says_when_the_two_eps_trained_with_different_schedules():
    one, five = gaussian(1, accuracy=0.6), gaussian(5, accuracy=0.7)
    for runs, epochs in ((one, 16), (five, 24)):
        for r in runs:
            r.train.epochs = epochs
    c = C.claim_b(one + five, "smallcnn")
    assert "not ε alone: ε = 1 trained 16 epochs and ε = 5 24 (their DP schedules)" in c.evidence
    assert "not ε alone" not in _b(0.6, 0.7).evidence  # the same recipe (or none recorded): nothing to say


# --------------------------------------------------------------------------------- (c) and (c_low)


def _c(lap_quality, seeds=(0, 1, 2), eps=(1, 5, 10), **kw):
    runs = []
    for e in eps:
        runs += make(
            "finetune-gaussian", "gaussian", seeds, epsilon=e, trainable="head", seed_sd=kw.get("seed_sd", 0.3)
        )
        runs += make("finetune-laplace", "laplace", seeds, epsilon=e, trainable="head", quality=lap_quality, **kw)
    return runs


def test_c_is_superiority_of_laplace_decided_on_the_fine_tuned_pair():
    assert C.claim_c(_c(+10), "smallcnn", CONFIG).status == "reproduced"
    assert C.claim_c(_c(-10), "smallcnn", CONFIG).status == "contradicted"  # Gaussian better
    same = C.claim_c(_c(0.0, seed_sd=0.05), "smallcnn", CONFIG)  # precisely equal: Laplace shown not better
    assert same.status == "contradicted"
    assert C.claim_c(_c(+3, seed_sd=4.0), "smallcnn", CONFIG).verdict == "inconclusive"
    assert C.claim_c(_c(+10, seeds=(0,)), "smallcnn", CONFIG).verdict == "inconclusive (one seed)"
    c = C.claim_c(_c(+10, degenerate=True), "smallcnn", CONFIG)
    assert c.status == "inconclusive" and "degenerate" in c.reason
    assert "fine-tuned on the public trunk" in c.evidence


def test_c_low_needs_laplace_at_half():
    assert C.claim_c_low(_c(0), "smallcnn").reason.startswith("not measured")
    dead = _c(0, eps=(0.5, 1), degenerate=True)
    assert C.claim_c_low([r for r in dead if r.spec.family == "finetune-laplace"], "smallcnn").status == "reproduced"
    alive = [r for r in _c(0, eps=(0.5, 1)) if r.spec.family == "finetune-laplace"]
    assert C.claim_c_low(alive, "smallcnn").status == "contradicted"
    one = [r for r in _c(0, eps=(0.5, 1), seeds=(0,), degenerate=True) if r.spec.family == "finetune-laplace"]
    assert C.claim_c_low(one, "smallcnn").verdict == "inconclusive (one seed)"


# --------------------------------------------------------------------------------- (d)


def _d(q_low, q_high, seeds=(0, 1, 2), **kw):
    runs = reference(seeds)
    runs += make("ldp", "ldp", seeds, ldp="singh-sikka-eps0.25", epsilon=0.25, quality=q_low, **kw)
    runs += make("ldp", "ldp", seeds, ldp="singh-sikka-eps1", epsilon=1, quality=q_high)
    return C.claim_d(runs, "smallcnn")


def test_d_needs_the_most_private_worse_than_infinity_and_than_the_least_private():
    assert _d(-10, -2).status == "reproduced"
    assert _d(-10, -10).verdict == "inconclusive"  # worse than ∞ but no trend over ε
    assert _d(+10, +2).status == "contradicted"
    assert _d(-10, -2, seeds=(0,)).verdict == "inconclusive (one seed)"
    c = _d(-10, -2, degenerate=True)
    assert c.status == "inconclusive" and "degenerate" in c.reason


# --------------------------------------------------------------------------------- (e)


def test_e_needs_the_jump_and_the_rise():
    assert C.claim_e(rows_of((0.5, -20), (10, -10))[1]).status == "reproduced"
    assert C.claim_e(rows_of((0.5, -10), (10, -10))[1]).verdict == "inconclusive"  # a jump without a rise
    assert C.claim_e(rows_of((0.5, -10), (10, +10))[1]).status == "contradicted"  # ε = 10 above ∞
    assert C.claim_e(rows_of((0.5, -20), (10, -10), seeds=(0,))[1]).verdict == "inconclusive (one seed)"
    c = C.claim_e(rows_of((0.5, -20), (10, -10, {"degenerate": True}))[1])
    assert c.status == "inconclusive" and "degenerate" in c.reason


# --------------------------------------------------------------------------------- (f)


def _f(acc_big, degenerate, seeds=(0, 1, 2)):
    runs = gaussian(1, seeds, accuracy=0.6)
    runs += make("clip-sweep", "gaussian", seeds, epsilon=1, clip=10, accuracy=acc_big, degenerate=degenerate)
    return C.claim_f(runs, GRID, "smallcnn", CONFIG)


def test_f_collapse_needs_a_drop_and_a_degenerate_model_and_no_drop_is_shown_within_the_margin():
    assert _f(0.2, True).status == "reproduced"
    assert _f(0.6, False).status == "contradicted"  # shown to lose less than the accuracy margin
    assert _f(0.45, False).verdict == "inconclusive"  # lower, but not collapsed
    assert _f(0.2, True, seeds=(0,)).verdict == "inconclusive (one seed)"


# --------------------------------------------------------------------------------- the answer: non-inferiority


def test_the_answer_is_non_inferiority_against_the_margins_not_non_significance():
    precise = {"seed_sd": 0.05}
    _, rows = rows_of((1, -0.3, {"seed_sd": 6.0}), (5, -0.3, precise), (10, -0.3, precise), ref_kw=precise)
    a = answer(rows, HEADLINE, CONFIG.margins)
    # ε = 1: a small loss with a wide interval reaches past the margins: not shown, so the answer starts at 5
    assert a.cells[(1, "avg_drop_pct")] == "not shown" and a.smallest == 5
    _, rows = rows_of((1, -20, precise), (10, -0.2, precise), ref_kw=precise)
    assert answer(rows, HEADLINE, CONFIG.margins).smallest == 10
    _, rows = rows_of((1, -0.2, {"degenerate": True}), (10, -0.2))
    assert answer(rows, HEADLINE, CONFIG.margins).cells[(1, "masked_score_pct")] == "degenerate"


# --------------------------------------------------------------------------------- bad input


def test_a_run_without_a_partner_seed_is_named_and_makes_the_claim_inconclusive():
    runs = reference((0, 1)) + gaussian(1, quality=-10) + gaussian(10, quality=-3)  # ∞ lacks seed 2
    rows = eps_rows(runs, "gaussian", "smallcnn")
    d = rows[0].diffs["avg_drop_pct"]
    assert d.mean is None and "gaussian-eps1-smallcnn-s2 has no partner of seed 2" in d.problem
    c = C.claims_a(rows)[0]
    assert c.status == "inconclusive" and "no partner" in c.reason


def test_an_unreadable_per_image_file_is_named_and_makes_the_claim_inconclusive():
    runs, _ = rows_of((1, -10), (10, -3))
    runs[4].unreadable = "per_image"  # gaussian ε = 1, seed 1
    rows = eps_rows(runs, "gaussian", "smallcnn")
    c = C.claims_a(rows)[0]
    assert c.status == "inconclusive" and "per_image.npz is truncated" in c.reason
    assert rows[0].diffs["test_accuracy"].mean is not None  # predictions are still read


def test_seeds_that_scored_different_images_are_paired_on_the_images_they_share_never_cut():
    runs, _ = rows_of((1, -10))
    runs[3].index = runs[3].index[::-1].copy()  # another order
    runs[4].index = runs[4].index[50:]  # fewer images
    d = compare(runs[3:6], runs[:3], label("masked_score_pct"))
    assert d.images == 150 and d.per_seed_images == [150, 150, 150]
    full = compare(runs[3:6], runs[:3], label("masked_score_pct"))
    assert np.isfinite(full.mean)


# --------------------------------------------------------------------------------- what privacy costs, split


def test_the_gap_splits_into_budget_clipping_and_noise_that_add_up():
    runs = reference(seed_sd=0.05, accuracy=0.85)
    runs += make("baseline", "none", (0, 1, 2), schedule="long", quality=-3, accuracy=0.80, seed_sd=0.05)
    runs += make("baseline", "clip-only", (0, 1, 2), schedule="long", quality=-5, accuracy=0.75, seed_sd=0.05)
    runs += gaussian(10, quality=-9, accuracy=0.60, seed_sd=0.05)
    (row,) = eps_rows(runs, "gaussian", "smallcnn", {10: "long"})
    assert row.schedule == "long"
    for key in ("test_accuracy", "masked_score_pct", "avg_drop_pct"):
        parts = row.split[key]
        total = sum(parts[p].mean for p in ("budget", "clipping", "noise"))
        assert total == pytest.approx(row.diffs[key].mean, abs=1e-9)  # paired on the same seeds and images
    acc = row.split["test_accuracy"]
    share = {a: float((DIFFICULTY < a).mean()) for a in (0.85, 0.80, 0.75, 0.60)}  # the images each gets right
    assert acc["budget"].mean == pytest.approx(share[0.80] - share[0.85], abs=0.005)
    assert acc["noise"].mean == pytest.approx(share[0.60] - share[0.75], abs=0.005)
    gain = row.split["avg_drop_pct"]  # lower is better: the parts are losses, so positive
    assert gain["clipping"].mean > 0 and gain["clipping"].worse
    (plain,) = eps_rows(runs, "gaussian", "smallcnn")  # without the ε's schedule there is nothing to split by
    assert plain.split == {}


def test_f_is_decided_on_the_held_reading_and_reports_both():
    runs = gaussian(1, accuracy=0.6)
    runs += make("clip-sweep", "gaussian", (0, 1, 2), epsilon=1, clip=10, accuracy=0.2, degenerate=True)
    runs += make("clip-sweep", "gaussian", (0, 1, 2), epsilon=1, clip=10, held=True, accuracy=0.6)
    c = C.claim_f(runs, GRID, "smallcnn", CONFIG)
    assert c.status == "contradicted" and "lr·C held" in c.evidence and "lr fixed" in c.evidence
