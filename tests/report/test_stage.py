"""The report stage as a whole: what it skips, and that a failure leaves the old report (or none) intact."""

from pathlib import Path

import pytest

from dpcam import report as rep
from dpcam.errors import UserError
from dpcam.report import figures
from tests.report.fakes import fake_grid, md_row, write_fake_runs


@pytest.mark.slow
def test_skipped_families_are_said_not_drawn():
    write_fake_runs(fake_grid())
    rep.report(fake_grid())
    grid = fake_grid(laplace=[], ldp=[], clip_sweep={"epsilon": 1, "clips": []}, train_sizes={"sizes": []}, seeds=[0])
    summary = rep.report(grid)  # the same files, a smaller grid: the old report's extra pictures go
    assert not Path("reports/figures/fig4_ldp_explanations.png").exists()
    assert not Path("reports/tables/table2_laplace.md").exists()
    page = Path("reports/index.html").read_text()
    assert "fig4_ldp_explanations.png: skipped" in page and "Table 2: global DP, Laplace (L1 clip): skipped" in page
    # no audit.json anywhere: no audit rows, the leakage figure is skipped with the reason
    assert "MIA AUC" not in Path("reports/tables/table1_gaussian.md").read_text()
    assert not Path("reports/figures/fig_leakage_vs_eps.png").exists()
    assert "fig_leakage_vs_eps.png: skipped, no Gaussian or Laplace run has audits" in page
    assert "No run has been audited" in page
    # one seed: means without ±
    assert md_row(Path("reports/tables/table1_gaussian.md").read_text(), "smallcnn", "Test accuracy")[1] == "0.500"
    assert summary["runs"] == 1 + 1 + 2


@pytest.mark.slow
def test_missing_run_file_is_one_line_and_leaves_old_report_intact():
    grid = fake_grid()
    write_fake_runs(grid)
    rep.report(grid)
    before = {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()}
    Path("metrics/laplace/laplace-eps5-smallcnn-s1/explain.json").unlink()
    with pytest.raises(UserError) as e:
        rep.report(grid)
    msg = str(e.value)
    assert "\n" not in msg and "laplace-eps5-smallcnn-s1" in msg
    assert "metrics/laplace/laplace-eps5-smallcnn-s1/explain.json" in msg and "dvc repro" in msg
    assert {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()} == before
    assert [p.name for p in Path(".").iterdir() if p.name.startswith(".reports")] == []


def test_missing_file_without_old_report_writes_nothing(monkeypatch):
    grid = fake_grid()
    write_fake_runs(grid, skip={("none-epsinf-smallcnn-s0", "train.json")})
    with pytest.raises(
        UserError, match=r"none-epsinf-smallcnn-s0: missing models/baseline/none-epsinf-smallcnn-s0/train.json"
    ):
        rep.report(grid)
    assert not Path("reports").exists()


@pytest.mark.slow
def test_failure_while_building_leaves_no_partial_report(monkeypatch):
    grid = fake_grid()
    write_fake_runs(grid)
    rep.report(grid)
    before = {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "fig_cams", boom)  # the stage draws the Grad-CAM grids through dpcam.report.figures
    with pytest.raises(RuntimeError):
        rep.report(grid)
    assert {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()} == before
    assert [p.name for p in Path(".").iterdir() if p.name.startswith(".reports")] == []
