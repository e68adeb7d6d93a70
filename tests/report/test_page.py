"""index.html and the flat files next to it (runs.csv, metrics.json, plots/*.csv) on the tiny grid."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dpcam import layout
from dpcam import report as rep
from tests.report.fakes import VIOLATING, fake_grid, read_csv


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.slow
def test_index_references_only_existing_files_and_flat_files_parse(in_built):
    _, summary = in_built
    assert Path("reports/figures/cams.png").read_bytes() == b"\x89PNG mine"
    # every figure but the cost split, which needs DP schedules (the fake grid has none: test_verdict.py draws it),
    # and the verdict per method, which needs several explain.methods (test_methods.py draws it)
    left_out = {layout.FIG_COST_SPLIT, layout.FIG_VERDICT, layout.FIG_METHODS}
    assert {Path(f).name for f in summary["figures"]} == rep.FIGURE_NAMES - left_out
    assert re.fullmatch(r"#/experiments/\d+/runs\?workflowType=machine_learning", summary["mlflow"])
    import mlflow

    from dpcam import tracking  # the verdict run: its description the answer, its artifacts the words and picture

    (verdict,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`dpcam.kind` = 'verdict'"
    ).itertuples()
    run = tracking.get_run(verdict.run_id)
    assert run.data.tags["mlflow.note.content"].startswith("**Verdict of grid")
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(verdict.run_id)}
    assert {"verdict.md", layout.FIG_VERDICT} <= names
    page = Path("reports/index.html").read_text()  # the verdict's forest plot opens its section, above the tables
    assert page.index('id="verdict"') < page.index(f'src="figures/{layout.FIG_VERDICT}"') < page.index("<table")
    page = Path("reports/index.html").read_text()
    parser = _Refs()
    parser.feed(page)
    local = [r for r in parser.refs if not re.match(r"^[a-z]+:|^#", r)]
    assert "ldp-tiny.png" in local and "figures/fig3_accuracy_vs_eps.png" in local
    for ref in local:
        assert (Path("reports") / ref).exists(), ref
    for name in (
        "fig3_accuracy_vs_eps",
        "fig4_ldp_explanations",
        "fig6a_masked_accuracy_vs_eps",
        "fig6b_masked_accuracy_vs_clip",
        "fig_train_size",
        "fig2_ldp_cams",
        "fig5_gaussian_cams",
        "fig5_laplace_cams",
        "fig_leakage_vs_eps",
    ):
        assert Path(f"reports/figures/{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}.png" in summary["figures"]
    assert Path("reports/ldp-tiny.png").exists()  # another stage's output is left alone
    for mlflow_id in ("0" * 31 + "1", "models:/m-1"):
        assert mlflow_id in page
    assert "no image-level guarantee (fake)" in page and "<script" not in page

    metrics = json.loads(Path("reports/metrics.json").read_text())  # the verdict's few numbers: dvc's columns
    assert list(metrics)[:4] == ["model", "seeds", "expl_ok_from_eps", "acc_ok_from_eps"]
    assert len(metrics) <= 40 and max(map(len, metrics)) <= 20  # a column each in `dvc exp show`
    assert not any(isinstance(v, (dict, list)) for v in metrics.values())
    assert metrics["d_acc_e1_lo"] <= metrics["d_acc_e1"] <= metrics["d_acc_e1_hi"] and "d_mscore_e1" in metrics
    runs = {r["run"]: r for r in read_csv("reports/runs.csv")}  # every run's numbers are in runs.csv
    g1 = runs["gaussian-eps1-smallcnn-s0"]
    assert float(g1["test_accuracy"]) == 0.5 and float(g1["epsilon"]) == pytest.approx(0.99) and g1["degenerate"] == "0"

    acc = read_csv("reports/plots/accuracy_vs_eps.csv")
    assert len(acc) == 2 * (2 + 1 + 2)  # seeds × (gaussian ε + laplace ε + baselines)
    row = next(r for r in acc if r["run"] == "gaussian-eps1-smallcnn-s1")
    assert (row["scheme"], float(row["epsilon"]), row["seed"], float(row["test_accuracy"])) == (
        "gaussian",
        1.0,
        "1",
        0.7,
    )
    # dvc plots draws one series per scheme column; NaN (not blank, which Vega-Lite reads as 0) elsewhere
    assert row["gaussian_test_accuracy"] == row["test_accuracy"] and row["laplace_test_accuracy"] == "NaN"
    none = next(r for r in acc if r["run"] == "none-epsinf-smallcnn-s0")
    assert none["epsilon_achieved"] == "NaN" and all(v != "" for v in none.values())
    assert {r["epsilon"] for r in acc if r["scheme"] in ("none", "clip-only")} == {"inf"}
    ex = read_csv("reports/plots/explain_vs_eps.csv")
    assert len(ex) == len(acc) and {"avg_drop_pct", "laplace_masked_score_pct", "map_agreement"} <= set(ex[0])

    runs = read_csv("reports/runs.csv")
    assert len(runs) == 20
    r0 = next(r for r in runs if r["run"] == "gaussian-eps1-smallcnn-s0")
    assert float(r0["noise_multiplier"]) == 1.1 and r0["test_pred_histogram.1"] == "4"
    assert float(r0["avg_drop_pct"]) == 20.0 and r0["degeneracy.degenerate"] == "0"
    assert float(r0["audit.mia_auc_loss"]) == 0.52 and r0["audit.violation"] == "0"
    ldp = next(r for r in runs if r["run"] == "ldp-singh-sikka-eps0.5-smallcnn-s0")
    assert float(r0["audit.mia_epsilon_lb"]) == 0.1 and ldp.get("audit.mia_auc", "") == ""  # missing stays missing


@pytest.mark.slow
def test_audit_section_says_violations_loudly(in_built):
    page = Path("reports/index.html").read_text()
    section = page.split('<h2 id="audit">', 1)[1].split("<h2", 1)[0]
    assert 'class="deg">VIOLATION' in section and f"{VIOLATING} (loss)" in section
    assert "gaussian-eps1-smallcnn-s0" in section and "not checked" in section  # baselines: no ε to check
    assert "ldp-singh-sikka" not in section  # not audited: not listed


def test_the_page_links_the_search_report_only_when_it_exists():
    from dpcam.report import render_html

    grid = fake_grid()
    assert "search/index.html" not in render_html(grid, [], [], [], [], [])
    assert '<a href="search/index.html">' in render_html(grid, [], [], [], [], [], search=True)
