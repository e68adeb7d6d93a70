"""The report's tables on the tiny hand-written grid: cells checked against hand-computed numbers."""

import json
import math
from pathlib import Path

import pytest

from dpcam import report as rep
from dpcam.families import grid_runs
from tests.report.fakes import T_975_1, md_row, read_csv


@pytest.mark.slow
def test_report_tables_match_hand_computed_values(in_built):
    grid, summary = in_built
    assert (
        summary["runs"] == len(grid_runs(grid)) == 20
    )  # 2 seeds × (2 baselines + 2 gaussian + laplace + laplace-paper + ldp + 2 clip (lr fixed, lr·C held) + size)
    t1 = Path("reports/tables/table1_gaussian.md").read_text()
    header = md_row(t1, "smallcnn", "metric")
    assert header == ["metric", "ε = 1 (n = 2)", "ε = 5 (n = 2)", "ε = ∞ (n = 2)"]  # seeds per cell
    assert md_row(t1, "smallcnn", "Test accuracy")[1] == "0.600 ± 1.271"
    # Average Drop 20 / 30: mean 25, half-width 12.706 · 7.0711 / 1.4142 = 63.53
    assert md_row(t1, "smallcnn", "Average Drop")[1] == "25.00 ± 63.53"
    # map agreement is absent for the non-private run: a dash, not a number
    assert md_row(t1, "smallcnn", "Map agreement")[3] == "—"
    # the CSV holds the same numbers unrounded
    rows = read_csv("reports/tables/table1_gaussian.csv")
    acc = next(r for r in rows if r["column"] == "ε = 1" and r["metric"] == "test_accuracy")
    assert float(acc["mean"]) == pytest.approx(0.6) and float(acc["ci95"]) == pytest.approx(T_975_1 * 0.1)
    assert acc["n"] == "2" and acc["runs"] == "gaussian-eps1-smallcnn-s0 gaussian-eps1-smallcnn-s1"
    inf = next(r for r in rows if r["column"] == "ε = ∞" and r["metric"] == "map_agreement")
    assert inf["mean"] == "" and inf["n"] == "0" and inf["x"] == "inf"

    # other tables: their columns
    assert md_row(Path("reports/tables/table2_laplace.md").read_text(), "smallcnn", "metric")[1:] == [
        "ε = 5 (n = 2) †",
        "ε = ∞ (n = 2)",
    ]
    assert md_row(Path("reports/tables/table3_ldp.md").read_text(), "smallcnn", "metric")[1:] == [
        "singh-sikka ε = 0.5 (n = 2)",
        "no LDP (ε = ∞) (n = 2)",
    ]
    assert md_row(Path("reports/tables/table4_clip_sweep.md").read_text(), "smallcnn", "metric")[1:] == [
        "C = 0.1, lr fixed (n = 2)",
        "C = 0.1, lr·C held (n = 2)",
        "C = 1 (main run) (n = 2)",
    ]
    assert md_row(Path("reports/tables/table5_train_size.md").read_text(), "smallcnn", "metric")[1:] == [
        "n = 100, ε = 5 (n = 2)",
        "n = 28 (all), ε = 5 (n = 2)",
    ]
    assert md_row(Path("reports/tables/table6_baselines.md").read_text(), "smallcnn", "metric")[1:] == [
        "none (no clipping, no noise) (n = 2)",
        "clip-only (clipping, no noise) (n = 2)",
    ]
    # the audit column group: loss-attack AUC 0.52 / 0.56 -> 0.540 ± 12.706 · 0.028284 / 1.4142 = 0.254
    assert md_row(t1, "smallcnn", "MIA AUC (loss)")[1] == "0.540 ± 0.254"
    assert md_row(t1, "smallcnn", "Empirical ε lower bound")[1] == "0.20 ± 1.27"
    assert md_row(t1, "smallcnn", "MIA AUC (Grad-CAM entropy)")[1:] == ["0.530 ± 0.000"] * 3
    lb = next(r for r in rows if r["column"] == "ε = 1" and r["metric"] == "mia_epsilon_lb")
    assert float(lb["mean"]) == pytest.approx(0.2) and float(lb["ci95"]) == pytest.approx(
        T_975_1 * math.sqrt(0.02) / math.sqrt(2)
    )
    # partly audited table (ldp runs not audited, its ε = ∞ baseline column is): a dash where audit.json is missing
    assert md_row(Path("reports/tables/table3_ldp.md").read_text(), "smallcnn", "MIA AUC (loss)")[1:] == [
        "—",
        "0.500 ± 0.000",
    ]
    # the clip-sweep's main column is the Gaussian ε = 1 run: same accuracy cell
    assert (
        md_row(Path("reports/tables/table4_clip_sweep.md").read_text(), "smallcnn", "Test accuracy")[3]
        == "0.600 ± 1.271"
    )


def test_degenerate_runs_are_marked(in_built):
    t2 = Path("reports/tables/table2_laplace.md").read_text()
    assert "ε = 5 (n = 2) †" in t2 and rep.DEGENERATE_NOTE in t2
    assert "†" not in Path("reports/tables/table1_gaussian.md").read_text()
    page = Path("reports/index.html").read_text()
    assert "laplace-eps5-smallcnn-s1: near chance: fake" in page
    runs = {r["run"]: r for r in read_csv("reports/runs.csv")}
    assert runs["laplace-eps5-smallcnn-s1"]["degenerate"] == "1"


@pytest.mark.slow
def test_table2_sets_valid_laplace_beside_the_unguaranteed_replica_and_gaussian(tmp_path, monkeypatch):
    """With public pretraining on: Table 2a (finetune-laplace's) puts, at each ε, valid Laplace fine-tuned, the
    paper's replica (NO guarantee) and Gaussian fine-tuned and from scratch side by side; 2b compares from scratch
    with fine-tuned for each noise."""
    from tests.report.fakes import fake_grid, write_fake_runs

    monkeypatch.chdir(tmp_path)
    grid = fake_grid(seeds=[0], finetune={"schemes": ["none", "gaussian", "laplace"]})
    write_fake_runs(grid)
    rep.report(grid)
    t2a = Path("reports/tables/table2a_laplace_valid_vs_paper.md").read_text()
    assert md_row(t2a, "smallcnn", "metric")[1:] == [
        "Laplace (L1, valid), fine-tuned ε = 5 (n = 1)",
        "laplace-paper (NO guarantee), from scratch, nominal ε = 5 (n = 1)",
        "Gaussian, fine-tuned ε = 5 (n = 1)",
        "Gaussian, from scratch ε = 5 (n = 1)",
        "ε = ∞, fine-tuned (n = 1)",
        "ε = ∞, from scratch (n = 1)",
    ]
    t2b = Path("reports/tables/table2b_scratch_vs_finetuned.md").read_text()
    assert md_row(t2b, "smallcnn", "metric")[1:5] == [
        "Gaussian, from scratch ε = 5 (n = 1)",
        "Gaussian, fine-tuned ε = 5 (n = 1)",
        "Laplace (L1), from scratch ε = 5 (n = 1)",
        "Laplace (L1), fine-tuned ε = 5 (n = 1)",
    ]
    # each cell is the run's own value: the fine-tuned Gaussian column shows the finetune-gaussian run's accuracy
    acc = json.loads(Path("models/finetune-gaussian/gaussian-eps5-ft-head-smallcnn-s0/train.json").read_text())
    assert md_row(t2a, "smallcnn", "Test accuracy")[3] == f"{acc['test_accuracy']:.3f}"
