"""The verdict per explanation method: answers at the Bonferroni level, claim (a)'s family over methods, each
method's sanity, the agreement between methods; the section, picture and files of a report of several methods."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dpcam import report as rep
from dpcam.config import GridConfig, VerdictConfig
from dpcam.report.claims import claims_a
from dpcam.report.compare import eps_rows
from dpcam.report.methods import by_method
from dpcam.report.methods_text import markdown
from dpcam.report.verdict import answer
from tests.report.fakes import fake_grid, write_fake_runs
from tests.report.synthetic import gaussian, reference

METHODS = ("gradcam", "integrated-gradients", "guided-gradcam")
GRID = GridConfig(seeds=[0, 1, 2], gaussian=[1, 5, 10])


def _study(by_method=None, methods=METHODS):
    quiet = {"seed_sd": 0.05}  # seeds that agree: 3 seeds show non-inferiority even at the methods' level
    runs = reference(**quiet) + gaussian(1, quality=-10, **quiet) + gaussian(5, **quiet) + gaussian(10, **quiet)
    for r in runs:
        r.methods = methods
        r.by_method = by_method or {}
    return runs


def _by_method(by):
    """Per method, how the runs of each ε score ({"quality": ...} per ε via the runs' own quality unless given)."""
    runs = _study()
    for r in runs:
        eps = r.spec.epsilon
        r.by_method = {m: {"quality": f(eps, r.quality), "fixed": fixed} for m, (f, fixed) in by.items()}
        r.by_method["agreement"] = {
            "gradcam|integrated-gradients": np.full(200, 0.6 if eps in (None, 10, 5) else 0.3),
            "gradcam|guided-gradcam": np.full(200, 0.5),
            "integrated-gradients|guided-gradcam": np.full(200, 0.5),
        }
    return runs


SAME = (lambda eps, q: q, {"map_agreement": np.full(200, 0.6), "randomisation_agreement": np.full(200, 0.1)})
WORSE_EVERYWHERE = (
    lambda eps, q: q if eps is None else -10.0,
    {"map_agreement": np.full(200, 0.6), "randomisation_agreement": np.full(200, 0.1)},
)
BLIND = (lambda eps, q: q, {"map_agreement": np.full(200, 0.8), "randomisation_agreement": np.full(200, 0.8)})


def test_one_method_gives_no_section():
    assert by_method(_study(methods=("gradcam",)), GRID, "smallcnn") is None
    assert markdown(None) == []


def test_each_method_its_answer_sanity_and_the_agreement_between_methods():
    runs = _by_method({"gradcam": SAME, "integrated-gradients": WORSE_EVERYWHERE, "guided-gradcam": BLIND})
    b = by_method(runs, GRID, "smallcnn", VerdictConfig())
    assert b.methods == list(METHODS) and b.alpha == pytest.approx(0.05 / 3)
    smallest = {v.method: v.answer.smallest for v in b.verdicts}
    assert smallest == {"gradcam": 5.0, "integrated-gradients": None, "guided-gradcam": 5.0}
    sanity = {v.method: v.sanity.depends_on_model for v in b.verdicts}
    assert sanity == {"gradcam": True, "integrated-gradients": True, "guided-gradcam": False}
    # agreement of gradcam and IG drops at ε = 1 (0.3 against 0.6 at ∞): marked after Holm; the others do not move
    marks = {(pair, e): d.mark for pair, row in b.agreement.items() for e, d in row}
    assert marks[("gradcam|integrated-gradients", 1.0)] == "▼" and marks[("gradcam|integrated-gradients", 5.0)] == ""
    assert not any(marks[("gradcam|guided-gradcam", e)] for e in (1.0, 5.0, 10.0))
    assert b.reference_agreement["gradcam|integrated-gradients"] == pytest.approx(0.6, abs=0.01)
    text = "\n".join(markdown(b, "figures/fig_methods.png"))
    assert "integrated-gradients: no ε" in text and "the methods' answers differ" in text
    assert "Read with care: the maps of guided-gradcam are not distinguishably closer" in text
    assert "gradcam vs integrated-gradients at ε = 1" in text
    assert "each test one-sided at 0.833 %" in text and "Bonferroni" in text
    assert "| gradcam (headline) | yes: " in text and "| guided-gradcam | not shown: " in text


def test_the_answer_of_a_method_is_stricter_than_the_headline_answer():
    runs = reference() + gaussian(5, quality=0.0)
    rows = eps_rows(runs, "gaussian", "smallcnn")
    d = rows[0].diffs["avg_drop_pct"]
    assert d.worst_end(0.05 / 3) > d.worst_end()  # the wider interval reaches further into a loss
    assert d.noninferior(d.worst_end() + 1e-9) and not d.noninferior(d.worst_end() + 1e-9, 0.05 / 3)
    loose = answer(rows, ("avg_drop_pct",), {"avg_drop_pct": d.worst_end() + 1e-9})
    strict = answer(rows, ("avg_drop_pct",), {"avg_drop_pct": d.worst_end() + 1e-9}, 0.05 / 3)
    assert loose.smallest == 5.0 and strict.smallest is None


def test_claim_a_contradiction_family_spans_the_methods():
    quiet = {"seed_sd": 0.05}
    better = reference(**quiet) + gaussian(1, quality=10.0, **quiet) + gaussian(10, **quiet)  # ε = 1 beats ∞
    neutral = reference(**quiet) + gaussian(1, **quiet) + gaussian(10, **quiet)
    rows = eps_rows(better, "gaussian", "smallcnn")
    others = [eps_rows(neutral, "gaussian", "smallcnn") for _ in range(2)]
    alone, together = claims_a(rows), claims_a(rows, others, 0.05 / 3)
    assert alone[0].status == together[0].status == "contradicted"
    cells = [int(c.rule.split("Holm over the ")[1].split(" ")[0]) for c in (alone[0], together[0])]
    assert cells[1] == 3 * cells[0]  # the family: every reading's cells of all three methods
    assert not any(c.status == "contradicted" for c in claims_a(others[0], [rows, others[1]]))  # only its own cells


@pytest.mark.slow
def test_a_report_of_three_methods(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        grid = fake_grid()
        write_fake_runs(grid, methods=METHODS)
        rep.report(grid)
        md = Path("reports/verdict.md").read_text()
        page = Path("reports/index.html").read_text()
        assert "By explanation method" in md and "By explanation method" in page
        assert Path("reports/figures/fig_methods.png").stat().st_size > 0 and "fig_methods.png" in page
        assert "| gradcam vs integrated-gradients |" in md
        assert len(json.loads(Path("reports/metrics.json").read_text())) <= 40
        import mlflow

        from dpcam import tracking

        (verdict,) = mlflow.search_runs(
            search_all_experiments=True, filter_string="tags.`dpcam.kind` = 'verdict'"
        ).itertuples()
        words = tracking.get_run(verdict.run_id).data.tags["mlflow.note.content"]
        assert "per method" in words and "integrated-gradients: " in words
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(verdict.run_id)}
        assert "fig_methods.png" in names
    finally:
        os.chdir(old)
