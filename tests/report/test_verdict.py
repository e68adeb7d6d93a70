import json
from pathlib import Path

from dpcam.report.paired import Difference
from dpcam.report.verdict import QUALITY, EpsRow, claim_a, smallest_eps


def _row(eps, **diffs):
    keys = {
        k: Difference(0.0, -1.0, 1.0, 3, 100, better="lower" if k in ("avg_drop_pct", "deletion_auc") else "higher")
        for k in (*QUALITY, "test_accuracy")
    }
    for k, (lo, hi) in diffs.items():
        keys[k] = Difference((lo + hi) / 2, lo, hi, 3, 100, better=keys[k].better)
    return EpsRow(eps, [], keys, [])


def test_smallest_eps_is_where_nothing_is_worse_from_there_on():
    rows = [_row(0.5, insertion_auc=(-0.2, -0.1)), _row(1), _row(5, pointing_game=(-0.3, -0.1)), _row(10)]
    assert smallest_eps(rows, QUALITY) == 10  # ε = 1 passes alone, but ε = 5 is worse again
    assert smallest_eps(rows, ("test_accuracy",)) == 0.5
    assert smallest_eps([_row(1, avg_drop_pct=(1, 2))], QUALITY) is None  # Average Drop up: worse


def test_claim_a_rules():
    worse_low = _row(0.5, avg_drop_pct=(2, 5), increase_conf_pct=(-9, -1))
    assert claim_a([worse_low, _row(10)]).status == "reproduced"
    better = _row(5, avg_drop_pct=(-9, -2), masked_score_pct=(1, 3))  # private model explains "better"
    assert claim_a([worse_low, better]).status == "contradicted"
    assert claim_a([_row(0.5), _row(10)]).status == "inconclusive"
    flagged = [worse_low, _row(10)]
    flagged[0].flags = ["gaussian-eps0.5-smallcnn-s0 is undertrained"]
    c = claim_a(flagged)
    assert c.status == "inconclusive" and "undertrained" in c.evidence


def test_the_report_opens_with_the_verdict(in_built):
    md = Path("reports/verdict.md").read_text()
    assert md.startswith("# Verdict: grid") and "Explanations:" in md and "Accuracy:" in md
    for key in "abcdef":
        assert f"| ({key}) " in md
    page = Path("reports/index.html").read_text()
    assert page.index('id="verdict"') < page.index('id="tables"')
    verdict = json.loads(Path("reports/metrics.json").read_text())["verdict"]["smallcnn"]
    assert set(verdict["claims"]) == {*"abcdef", "a_matched", "a_road", "a_localisation"} and verdict["seeds"] == 2
    assert "delta_test_accuracy_eps1" in verdict


def test_claim_c_is_decided_on_the_valid_fine_tuned_pair_and_never_on_the_replica(tmp_path, monkeypatch):
    from dpcam import report as rep
    from tests.report.fakes import fake_grid, write_fake_runs

    monkeypatch.chdir(tmp_path)
    grid = fake_grid(seeds=[0], finetune={"schemes": ["none", "gaussian", "laplace"]})
    write_fake_runs(grid, degenerate=())
    rep.report(grid)
    c = next(line for line in Path("reports/verdict.md").read_text().splitlines() if line.startswith("| (c) "))
    assert "valid Laplace − Gaussian, both fine-tuned on the public trunk: ε = 5" in c
    assert "[not counted: the paper's replica laplace-paper (NO guarantee) − Gaussian" in c
    # without public pretraining the from-scratch families decide it
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    grid = fake_grid(seeds=[0])
    write_fake_runs(grid, degenerate=())
    rep.report(grid)
    c = next(line for line in Path("reports/verdict.md").read_text().splitlines() if line.startswith("| (c) "))
    assert "valid Laplace − Gaussian, both from scratch" in c
