import json
from pathlib import Path

import numpy as np
import pytest

from dpcam.config import VerdictConfig
from dpcam.report.compare import BOTH_CORRECT, HEADLINE, MATCHED, MEASURES
from dpcam.report.verdict import verdict
from dpcam.report.verdict_text import markdown
from tests.report.synthetic import gaussian, make, reference


def test_the_report_opens_with_the_verdict(in_built):
    md = Path("reports/verdict.md").read_text()
    assert md.startswith("# Verdict: grid") and "Explanations:" in md and "Accuracy:" in md
    for key in "abcdef":
        assert f"| ({key}) " in md
    page = Path("reports/index.html").read_text()
    assert page.index('id="verdict"') < page.index('id="tables"')
    metrics = json.loads(Path("reports/metrics.json").read_text())
    want = {*"abcdef", "a_matched", "a_road", "a_localisation", "c_low"}
    assert {k.removeprefix("claim_") for k in metrics if k.startswith("claim_")} == want and metrics["seeds"] == 2
    assert metrics["model"] == "smallcnn" and {"d_acc_e1", "d_acc_e1_lo", "d_acc_e1_hi"} <= set(metrics)


def _study():
    runs = reference()
    for eps, q in ((0.5, -10), (1, -4), (5, -1), (10, -0.2)):
        runs += gaussian(eps, quality=q, accuracy=0.8 - 0.1 / eps)
    runs += make("ldp", "ldp", (0,), ldp="singh-sikka-eps0.25", epsilon=0.25, quality=-5)
    runs += make("ldp", "ldp", (0,), ldp="singh-sikka-eps1", epsilon=1, quality=-1)
    return runs


def test_the_verdict_names_its_method_correction_margins_power_seeds_and_image_counts():
    from dpcam.config import GridConfig

    grid = GridConfig(seeds=[0, 1, 2])
    v = verdict(_study(), grid, "smallcnn", VerdictConfig())
    md = markdown([v], [], grid)
    assert "degrees of freedom calibrated so that the interval covers at least 95 %" in md
    cells = len(v.rows) * len(MEASURES)
    assert f"Benjamini–Hochberg (false-discovery rate 5 %) over all cells of one table — {cells} cells" in md
    assert f"{len(v.rows) * len(MATCHED + BOTH_CORRECT)} in the matched table" in md
    assert "| Average Drop % (both correct) ↓ |" in md
    assert "| Average Drop % | 7.2 | " in md and "detectable" in md  # margin and power per measure
    assert "(n 200 images per seed)" in md  # every matched cell prints its images
    assert "seeds 0, 1, 2: intervals cover training seeds and test images" in md
    assert "| (d) Local-DP explanations degrade as ε falls | Fig. 2, 4 | inconclusive (one seed) |" in md
    assert "agreement with the ε = ∞ maps (similarity" in md  # what the answer leaves out, and why
    assert v.explanations.keys == HEADLINE and "randomisation_agreement" in HEADLINE


def test_the_marks_are_corrected_and_the_raw_intervals_stay(monkeypatch):
    from dpcam.config import GridConfig

    grid = GridConfig(seeds=[0, 1, 2])
    runs = _study()
    holm = verdict(runs, grid, "smallcnn", VerdictConfig(marks="holm"))
    bh = verdict(runs, grid, "smallcnn", VerdictConfig(marks="bh"))
    raw = sum(d.distinguishable for r in bh.rows for k, d in r.diffs.items() if "|" not in k)
    marked_bh = sum(bool(d.mark) for r in bh.rows for k, d in r.diffs.items() if "|" not in k)
    marked_holm = sum(bool(d.mark) for r in holm.rows for k, d in r.diffs.items() if "|" not in k)
    assert marked_holm <= marked_bh <= raw and marked_holm < raw
    assert np.isclose(bh.rows[0].diffs["avg_drop_pct"].lo, holm.rows[0].diffs["avg_drop_pct"].lo)


@pytest.mark.slow
def test_a_truncated_per_image_file_is_one_line_and_the_claims_on_it_inconclusive(tmp_path, monkeypatch):
    from dpcam import report as rep
    from dpcam.families import grid_runs
    from tests.report.fakes import fake_grid, write_fake_runs

    monkeypatch.chdir(tmp_path)
    grid = fake_grid()
    write_fake_runs(grid, degenerate=())
    run = next(s for s in grid_runs(grid) if s.name == "gaussian-eps1-smallcnn-s0")
    path = run.metrics_dir / "per_image.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    summary = rep.report(grid)
    lines = [s for s in summary["skipped"] if "per_image.npz: not a readable .npz archive" in s]
    assert lines and all("\n" not in s and "gaussian-eps1-smallcnn-s0" in s for s in lines)
    claim_a = next(x for x in Path("reports/verdict.md").read_text().splitlines() if x.startswith("| (a) "))
    assert "| inconclusive (grid run gaussian-eps1-smallcnn-s0: " in claim_a


@pytest.mark.slow
def test_with_dp_schedules_the_verdict_splits_the_cost_and_draws_it(tmp_path, monkeypatch):
    from dpcam import report as rep
    from tests.report.fakes import fake_grid, write_fake_runs

    monkeypatch.chdir(tmp_path)
    schedules = {"short": {"max_epsilon": 1, "epochs": 1}, "long": {"epochs": 2}}
    grid = fake_grid(schedules=schedules, baselines=["none", "clip-only"])
    write_fake_runs(grid, degenerate=())
    summary = rep.report(grid)
    md = Path("reports/verdict.md").read_text()
    assert "What ε costs in accuracy (ε − ∞ = noise + clipping + budget" in md
    assert "| test accuracy: budget |" in md and "| ε = 1 (short) | ε = 5 (long) |" in md
    assert "figures/fig_cost_split.png" in summary["figures"] and Path("reports/figures/fig_cost_split.png").is_file()
    assert "Effort: the ε = ∞ reference trained" in md


def test_effort_names_a_reference_that_took_more_steps_or_examples():
    from types import SimpleNamespace as NS

    from dpcam.report.verdict_text import effort

    def run(scheme, epochs, steps, schedule=None, family="baseline"):
        spec = NS(family=family, scheme=scheme, model="m", schedule=schedule, epsilon=None, seed=0)
        return NS(spec=spec, train=NS(epochs=epochs, aug_mult=1, steps=steps))

    ref = run("none", 24, 1584)
    same_examples = NS(model="m", rows=[NS(epsilon=10.0, runs=[run("gaussian", 24, 394, family="gaussian")])])
    assert "it took more optimiser steps (smaller batches, the same examples) than the runs at ε = 10" in effort(
        same_examples, [ref]
    )
    fewer = NS(model="m", rows=[NS(epsilon=1.0, runs=[run("gaussian", 8, 131, family="gaussian")])])
    assert "the reference processed more examples than the private runs at ε = 1" in effort(fewer, [ref])
    equal = NS(model="m", rows=[NS(epsilon=1.0, runs=[run("gaussian", 24, 1584, family="gaussian")])])
    assert effort(equal, [ref]).endswith("no private run had less training than the reference.")


def test_a_cell_whose_interval_shows_a_loss_is_never_called_underpowered():
    from dpcam.report.compare import EpsRow
    from dpcam.report.paired import Difference
    from dpcam.report.verdict import answer
    from dpcam.report.verdict_text import _failing

    keys = ("masked_accuracy_pct", "masked_score_pct")
    diffs = {
        # below 0 but not beyond the 8.7 margin: a loss is shown (unadjusted), non-inferiority is not
        "masked_accuracy_pct": Difference(-10.0, -17.0, -4.0, 3, 200, a=9.0, b=0.5),
        # wide around 0: nothing shown either way, and the detectable loss exceeds the margin
        "masked_score_pct": Difference(-1.0, -12.0, 10.0, 3, 200, a=9.0, b=0.5),
    }
    a = answer([EpsRow(10.0, [], diffs, [])], keys, dict.fromkeys(keys, 8.7))
    assert a.cells == {(10.0, k): "not shown" for k in keys}
    assert a.underpowered == {(10.0, "masked_accuracy_pct"): False, (10.0, "masked_score_pct"): True}
    words = _failing(a)
    assert "for masked score % the loss these seeds and images detect with 80 % power is larger" in words
    assert "masked accuracy % the loss" not in words
    beyond = {"masked_accuracy_pct": Difference(-12.0, -15.0, -9.0, 3, 200, a=1.0, b=0.5)}
    assert answer([EpsRow(10.0, [], beyond, [])], keys[:1], {keys[0]: 8.7}).cells == {(10.0, keys[0]): "worse"}


def test_recipes_names_each_schedules_eps_and_the_budget():
    from dpcam.config import GridConfig
    from dpcam.report.verdict_text import recipes

    words = recipes(GridConfig())
    assert words.startswith("Recipes (each within the compute budget of 32 epochs of examples")
    assert "ε = ∞: sgd lr 0.1, momentum 0.9, batch 128, 32 epochs, cosine" in words
    assert (
        "ε = 0.5, 1 (short schedule): DP-SGD lr 1, momentum 0.9, Poisson batches at rate 1/⌈N/512⌉, 16 epochs, C 1"
        in words
    )
    long = (
        "ε = 5, 10 (long schedule): DP-SGD lr 1, momentum 0.9, Poisson batches at rate 1/⌈N/512⌉, 32 epochs, "
        "augment flip-shift, C 1"
    )
    assert long + "; its ε = ∞ reference the same with lr 0.4 and no clipping" in words
    one = recipes(GridConfig(gaussian=[2], schedules=None))
    assert "every ε: the train section's DP recipe" in one and "schedule)" not in one


@pytest.mark.slow
def test_the_verdict_reports_each_class_and_calibration(tmp_path, monkeypatch):
    from dpcam import report as rep
    from tests.report.fakes import fake_grid, write_fake_runs

    monkeypatch.chdir(tmp_path)
    grid = fake_grid()
    write_fake_runs(grid, degenerate=())
    rep.report(grid)
    md = Path("reports/verdict.md").read_text()
    assert "By class and calibration (DP's disparate impact" in md
    assert "| class 0 recall ↑ |" in md and "| class 1 recall ↑ |" in md and "| expected calibration error ↓ |" in md
    assert "the class with the largest point loss at each ε; a ranking of classes is not tested): ε = 1 class " in md
    assert "and clipping are in it, not split): ε = 1 " in md
    assert "privacy unit: one training image; δ·N = " in md
    assert Path("reports/figures/fig_calibration.png").is_file()


def test_a_class_recall_and_the_calibration_error_are_paired_differences_of_their_own_images():
    from types import SimpleNamespace as NS

    import numpy as np

    from dpcam.report.compare import CORRECT_KEY, ECE, compare, group_keys, label, recall

    def run(name, pred, prob, drop):
        index, label = np.arange(6), np.array([0, 0, 1, 1, 1, 2])
        return NS(
            spec=NS(seed=0, name=name),
            predictions={"index": index, "label": label, "pred": pred, "prob": prob},
            per_image={"index": index, "avg_drop_pct": np.asarray(drop, float)},
        )

    pa, pb = np.array([0, 1, 1, 0, 0, 2]), np.array([0, 0, 1, 1, 1, 2])
    a = run("a", pa, np.eye(3)[pa] * 0.9 + 0.1 / 3, [1, 2, 3, 4, 5, 6])
    b = run("b", pb, np.eye(3)[pb] * 0.9 + 0.1 / 3, [0] * 6)
    assert group_keys([b]) == ["test_ece", "recall_0", "recall_1", "recall_2"]
    assert compare([a], [b], recall(0)).mean == pytest.approx(-0.5)  # 1 of 2 against 2 of 2
    assert compare([a], [b], recall(1)).mean == pytest.approx(-2 / 3)
    assert compare([a], [b], recall(2)).mean == pytest.approx(0.0)
    # both 0.933 confident on every image (one bin): a right on 3 of 6 (ECE 0.433), b on all (ECE 0.067)
    assert compare([a], [b], ECE).mean == pytest.approx((0.9 + 0.1 / 3 - 0.5) - (1 - 0.9 - 0.1 / 3))
    # the paper's metrics where both are right: images 0, 2 and 5 (a is wrong on 1, 3, 4)
    both = compare([a], [b], label("avg_drop_pct"), (CORRECT_KEY, 0.0))
    assert both.mean == pytest.approx((1 + 3 + 6) / 3)


def test_provenance_states_the_privacy_unit_and_delta_times_n():
    from types import SimpleNamespace as NS

    from dpcam.config import GridConfig
    from dpcam.report.verdict_text import provenance

    def run(unit="image", k=None):
        return NS(
            train=NS(
                device="cpu", versions={}, epsilon=1.0, delta=1e-5, train_size=8400, privacy_unit=unit, group_size=k
            )
        )

    assert "privacy unit: one training image; δ·N = 0.084 (δ 1e-05, N 8400)" in provenance([run()], GridConfig())
    grouped = provenance([run("group", 2)], GridConfig())
    assert (
        "privacy unit: one patient of at most 2 training images (ε and δ per image converted by group privacy"
        in grouped
    )


def test_the_audit_line_says_per_training_set_size_what_the_attacks_see_and_whether_a_bound_broke():
    from types import SimpleNamespace as NS

    from dpcam.report.verdict_text import audit_line

    def run(scheme, lb, n, eps=None, done=False, violation=False, model="m", ldp=None, schedule=None, clip=None):
        spec = NS(name=scheme, scheme=scheme, epsilon=eps, model=model, ldp=ldp, schedule=schedule)
        spec.public, spec.trainable, spec.clip = False, None, clip
        check = NS(done=done, epsilon_replace_one=2 * eps if eps else None)  # replace-one: about twice the ε
        audit = NS(mia_epsilon_lb=lb, violation=violation, check=check, epsilon_lb_max_detectable=4.5)
        return NS(spec=spec, train=NS(train_size=n), audit=audit)

    runs = [
        run("none", 0.0, 8400),
        run("none", 0.0, 8400),
        run("gaussian", 0.0, 8400, 10.0, done=True),
        run("none", 0.36, 1000),
        run("gaussian", 0.05, 1000, 1.0, done=True),
        run("gaussian", 0.2, 1000, 10.0, done=True),
        run("none", 5.0, 1000, model="other"),  # another model's verdict
        run("none", 5.0, 8400, ldp="singh-sikka-eps1"),  # local-DP data: another question
        run("none", 5.0, 8400, schedule="long"),  # a reference of the split, not the non-private model
        run("gaussian", 0.0, 8400, 1.0, done=True, clip=0.1),  # the clipping sweep: checked, not listed
    ]
    line = audit_line(runs, "m")
    assert "on 8400 training images: ε = ∞ 0.00 (max of 2), ε = 10 0.00; on 1000 training images: ε = ∞ 0.36, " in line
    assert "ε = 10 0.20, ε = 1 0.05. 4 DP runs checked against their replace-one guarantee: no violation" in line
    assert "at ε = 10 the replace-one guarantee lies beyond the largest bound these samples can show" in line
    assert "where ε = ∞ shows 0 (8400 images) the attacks see nothing and that check has no power." in line
    seen = audit_line([*runs, run("none", 0.3, 8400), run("laplace-paper", 0.9, 8400)], "m")  # one seed sees it
    assert "ε = ∞ 0.30 (max of 3)" in seen and "no power" not in seen and "laplace-paper" not in seen
    one = audit_line([run("gaussian", 0.0, 8400, 1.0, done=True), run("none", 0.0, 8400)], "m")
    assert "1 DP run checked" in one
    assert audit_line([run("none", 0.2, 8400)], "m").endswith("on 8400 training images: ε = ∞ 0.20.")
    runs[5].audit.violation = True
    assert "4 DP runs checked against their replace-one guarantee: VIOLATION in gaussian;" in audit_line(runs, "m")
    assert audit_line(runs, "nobody") == ""
