"""The report stage on a tiny hand-written grid: tables and CI maths checked against hand-computed numbers."""

import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dpcam import report as rep
from dpcam.config import GridConfig, grid_runs
from dpcam.errors import UserError
from tests.conftest import make_tiny

T_975_1 = 12.706204736174707  # Student t quantile t_{0.975, 1}, from tables


def fake_grid(**kw) -> GridConfig:
    base = {"models": ["smallcnn"], "seeds": [0, 1], "gaussian": [1, 5], "laplace": [5],
            "baselines": ["none", "clip-only"], "ldp": ["singh-sikka-eps0.5"], "clip_sweep": {"epsilon": 1, "clips": [0.1]},
            "train_sizes": {"sizes": [100], "gaussian": [5], "none": False}}
    return GridConfig(**{**base, **kw})


# hand-chosen values: gaussian ε = 1 has test accuracy 0.5 / 0.7 and Average Drop 20 / 30 over seeds 0 / 1
SPECIAL = {
    ("gaussian-eps1-smallcnn-s0", "test_accuracy"): 0.5,
    ("gaussian-eps1-smallcnn-s1", "test_accuracy"): 0.7,
    ("gaussian-eps1-smallcnn-s0", "avg_drop_pct"): 20.0,
    ("gaussian-eps1-smallcnn-s1", "avg_drop_pct"): 30.0,
}


# hand-chosen audit values: loss-attack AUC 0.52 / 0.56 and ε lower bound 0.1 / 0.3 for gaussian ε = 1
AUDIT_SPECIAL = {
    ("gaussian-eps1-smallcnn-s0", "mia_auc_loss"): 0.52,
    ("gaussian-eps1-smallcnn-s1", "mia_auc_loss"): 0.56,
    ("gaussian-eps1-smallcnn-s0", "mia_epsilon_lb"): 0.1,
    ("gaussian-eps1-smallcnn-s1", "mia_epsilon_lb"): 0.3,
}
VIOLATING = "gaussian-eps5-smallcnn-s1"


def write_fake_audit(spec, k: int) -> None:
    """audits/<family>/<run>/audit.json as dpcam.audit writes it (the keys the report reads)."""
    from dpcam.audit import ATTACKS, audit_dir

    def v(key, default):
        return AUDIT_SPECIAL.get((spec.name, key), default)

    private = spec.scheme in ("gaussian", "laplace")
    aucs = {f"mia_auc_{a.replace('-', '_')}": v(f"mia_auc_{a.replace('-', '_')}", 0.5 + 0.01 * i) for i, a in enumerate(ATTACKS)}
    violation = spec.name == VIOLATING
    audit = {
        "run_name": spec.name, "dataset": "tiny", "privacy": {"scheme": spec.scheme, "epsilon": spec.epsilon, "delta": 1e-5},
        "members": 100, "non_members": 100, "attacks": {a: {"auc": aucs[f"mia_auc_{a.replace('-', '_')}"]} for a in ATTACKS},
        "mia_auc": max(aucs.values()), **aucs, "mia_epsilon_lb": v("mia_epsilon_lb", 0.05 * k),
        "epsilon_lb_max_detectable": 3.2, "violation": violation,
        "check": {"done": private, "bound": "pld-curve+eps-delta-line" if private else None,
                  "violations": ["loss"] if violation else []},
    }
    audit_dir(spec).mkdir(parents=True, exist_ok=True)
    (audit_dir(spec) / "audit.json").write_text(json.dumps(audit))


def write_fake_runs(grid: GridConfig, degenerate=("laplace-eps5-smallcnn-s1",), skip=(), audits=()) -> None:
    """train.json / explain.json / maps of every grid run, on a tiny prepared dataset (data/prepared/tiny);
    audit.json for the runs of the families in ``audits``."""
    data = make_tiny(n=40, size=16)
    from dpcam.data.store import load_dataset

    test_idx = load_dataset(data).splits["test"]
    for k, spec in enumerate(grid_runs(grid)):
        def v(key, default, name=spec.name):
            return SPECIAL.get((name, key), default)

        private, bad = spec.scheme in ("gaussian", "laplace"), spec.name in degenerate
        train = {
            "dataset": "tiny", "ldp": spec.ldp, "model": spec.model, "scheme": spec.scheme,
            "ldp_guarantee": {"words": "no image-level guarantee (fake)"} if spec.ldp else None,
            "target_epsilon": spec.epsilon if private else None, "epsilon": spec.epsilon * 0.99 if private else None,
            "delta": 1e-5, "noise_multiplier": 1.1 if private else None, "max_grad_norm": 1.0, "sample_rate": 0.03,
            "steps": 33, "accountant": "prv", "epsilon_rdp_check": 1.2 if private else None,
            "train_size": spec.train_size or 28, "test_accuracy": v("test_accuracy", 0.8 - 0.01 * k),
            "test_qwk": 0.5, "test_pred_histogram": [4, 4], "collapsed": False, "run_name": spec.name,
            "mlflow_run_id": f"{k:032x}", "mlflow_model_uri": f"models:/m-{k}",
        }
        explain = {
            "run_name": spec.name, "dataset": "tiny", "data_dir": str(data), "images": int(test_idx.size),
            "avg_drop_pct": v("avg_drop_pct", 10.0 + k), "increase_conf_pct": 40.0, "masked_score_pct": 55.0,
            "masked_accuracy_pct": 60.0 + k, "deletion_auc": 0.2, "insertion_auc": 0.7, "pointing_game": 0.5,
            "randomisation_agreement": 0.1,
            "degeneracy": {"degenerate": bad, "reasons": ["near chance: fake"] if bad else []}, "degenerate": bad, "accuracy": 0.8, "notes": [],
        }
        if spec.scheme != "none":
            explain["map_agreement"] = 0.4
        spec.model_dir.mkdir(parents=True, exist_ok=True)
        spec.metrics_dir.mkdir(parents=True, exist_ok=True)
        if (spec.name, "train.json") not in skip:
            (spec.model_dir / "train.json").write_text(json.dumps(train))
        if (spec.name, "explain.json") not in skip:
            (spec.metrics_dir / "explain.json").write_text(json.dumps(explain))
        rng = np.random.default_rng(k)
        np.save(spec.metrics_dir / "maps.npy", rng.random((test_idx.size, 16, 16)).astype(np.float16))
        np.save(spec.metrics_dir / "map_indices.npy", test_idx.astype(np.int64))
        if spec.family in audits:
            write_fake_audit(spec, k)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_row(md: str, section: str, label: str) -> list[str]:
    """Cells of the row starting with ``label`` in the Markdown section ``## <section>``."""
    block = md.split(f"## {section}", 1)[1]
    line = next(row for row in block.splitlines() if row.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fake grid's report, built once for the tests that only read it (laid out as ``dvc repro`` leaves it)."""
    import os

    root = tmp_path_factory.mktemp("report")
    old = os.getcwd()
    os.chdir(root)
    try:
        grid = fake_grid()
        write_fake_runs(grid, audits=("gaussian", "laplace", "baseline"))
        Path("reports/figures").mkdir(parents=True)
        Path("reports/ldp-tiny.png").write_bytes(b"\x89PNG fake")  # the ldp-figure stage's picture
        Path("reports/figures/cams.png").write_bytes(b"\x89PNG mine")  # `dpcam figure cams`'s default output
        summary = rep.report(grid)
    finally:
        os.chdir(old)
    return root, grid, summary


@pytest.fixture
def in_built(built, monkeypatch):
    monkeypatch.chdir(built[0])
    return built[1], built[2]


def test_mean_ci_matches_student_t_by_hand():
    mean, half = rep.mean_ci([0.5, 0.7])
    s = math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1)  # ddof = 1
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(T_975_1 * s / math.sqrt(2)) and half == pytest.approx(1.2706, abs=1e-4)
    # three seeds: t_{0.975,2} = 4.302653
    mean, half = rep.mean_ci([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.302653 * np.std([1, 2, 4], ddof=1) / math.sqrt(3), rel=1e-6)
    assert rep.mean_ci([0.3]) == (0.3, None)
    assert rep.mean_ci([]) == (None, None)
    assert rep.format_cell([0.5, 0.7], 3) == "0.600 ± 1.271"
    assert rep.format_cell([0.5], 3) == "0.500"
    assert rep.format_cell([], 3) == "—"


def test_report_tables_match_hand_computed_values(in_built):
    grid, summary = in_built
    assert summary["runs"] == len(grid_runs(grid)) == 16  # 2 seeds × (2 baselines + 2 gaussian + laplace + ldp + clip + size)
    t1 = Path("reports/tables/table1_gaussian.md").read_text()
    header = md_row(t1, "smallcnn", "metric")
    assert header == ["metric", "ε = 1", "ε = 5", "ε = ∞"]
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
    assert md_row(Path("reports/tables/table2_laplace.md").read_text(), "smallcnn", "metric")[1:] == ["ε = 5 †", "ε = ∞"]
    assert md_row(Path("reports/tables/table3_ldp.md").read_text(), "smallcnn", "metric")[1:] == \
        ["singh-sikka ε = 0.5", "no LDP (ε = ∞)"]
    assert md_row(Path("reports/tables/table4_clip_sweep.md").read_text(), "smallcnn", "metric")[1:] == \
        ["C = 0.1", "C = 1 (main run)"]
    assert md_row(Path("reports/tables/table5_train_size.md").read_text(), "smallcnn", "metric")[1:] == \
        ["n = 100, ε = 5", "n = 28 (all), ε = 5"]
    assert md_row(Path("reports/tables/table6_baselines.md").read_text(), "smallcnn", "metric")[1:] == \
        ["none (no clipping, no noise)", "clip-only (clipping, no noise)"]
    # the audit column group: loss-attack AUC 0.52 / 0.56 -> 0.540 ± 12.706 · 0.028284 / 1.4142 = 0.254
    assert md_row(t1, "smallcnn", "MIA AUC (loss)")[1] == "0.540 ± 0.254"
    assert md_row(t1, "smallcnn", "Empirical ε lower bound")[1] == "0.20 ± 1.27"
    assert md_row(t1, "smallcnn", "MIA AUC (Grad-CAM entropy)")[1:] == ["0.530 ± 0.000"] * 3
    lb = next(r for r in rows if r["column"] == "ε = 1" and r["metric"] == "mia_epsilon_lb")
    assert float(lb["mean"]) == pytest.approx(0.2) and float(lb["ci95"]) == pytest.approx(T_975_1 * math.sqrt(0.02) / math.sqrt(2))
    # partly audited table (ldp runs not audited, its ε = ∞ baseline column is): a dash where audit.json is missing
    assert md_row(Path("reports/tables/table3_ldp.md").read_text(), "smallcnn", "MIA AUC (loss)")[1:] == ["—", "0.500 ± 0.000"]
    # the clip-sweep's main column is the Gaussian ε = 1 run: same accuracy cell
    assert md_row(Path("reports/tables/table4_clip_sweep.md").read_text(), "smallcnn", "Test accuracy")[2] == "0.600 ± 1.271"


def test_degenerate_runs_are_marked(in_built):
    t2 = Path("reports/tables/table2_laplace.md").read_text()
    assert "ε = 5 †" in t2 and rep.DEGENERATE_NOTE in t2
    assert "†" not in Path("reports/tables/table1_gaussian.md").read_text()
    page = Path("reports/index.html").read_text()
    assert "laplace-eps5-smallcnn-s1: near chance: fake" in page
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics["laplace"]["laplace-eps5-smallcnn-s1"]["degenerate"] is True
    assert metrics["laplace"]["laplace-eps5-smallcnn-s0"]["degenerate"] is False
    runs = {r["run"]: r for r in read_csv("reports/runs.csv")}
    assert runs["laplace-eps5-smallcnn-s1"]["degenerate"] == "1"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_index_references_only_existing_files_and_flat_files_parse(in_built):
    _, summary = in_built
    assert Path("reports/figures/cams.png").read_bytes() == b"\x89PNG mine"
    assert {Path(f).name for f in summary["figures"]} == rep.FIGURE_NAMES
    page = Path("reports/index.html").read_text()
    parser = _Refs()
    parser.feed(page)
    local = [r for r in parser.refs if not re.match(r"^[a-z]+:|^#", r)]
    assert "ldp-tiny.png" in local and "figures/fig3_accuracy_vs_eps.png" in local
    for ref in local:
        assert (Path("reports") / ref).exists(), ref
    for name in ("fig3_accuracy_vs_eps", "fig4_ldp_explanations", "fig6a_masked_accuracy_vs_eps",
                 "fig6b_masked_accuracy_vs_clip", "fig_train_size", "fig2_ldp_cams", "fig5_gaussian_cams",
                 "fig5_laplace_cams", "fig_leakage_vs_eps"):
        assert Path(f"reports/figures/{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}.png" in summary["figures"]
    assert Path("reports/ldp-tiny.png").exists()  # another stage's output is left alone
    for mlflow_id in ("0" * 31 + "1", "models:/m-1"):
        assert mlflow_id in page
    assert "no image-level guarantee (fake)" in page and "<script" not in page

    metrics = json.loads(Path("reports/metrics.json").read_text())
    g1 = metrics["gaussian"]["gaussian-eps1-smallcnn-s0"]
    assert g1["test_accuracy"] == 0.5 and g1["epsilon"] == pytest.approx(0.99) and g1["degenerate"] is False
    assert "map_agreement" not in metrics["baseline"]["none-epsinf-smallcnn-s0"]  # missing stays missing
    assert set(metrics) == {"baseline", "gaussian", "laplace", "ldp", "clip-sweep", "train-size"}

    acc = read_csv("reports/plots/accuracy_vs_eps.csv")
    assert len(acc) == 2 * (2 + 1 + 2)  # seeds × (gaussian ε + laplace ε + baselines)
    row = next(r for r in acc if r["run"] == "gaussian-eps1-smallcnn-s1")
    assert (row["scheme"], float(row["epsilon"]), row["seed"], float(row["test_accuracy"])) == ("gaussian", 1.0, "1", 0.7)
    # dvc plots draws one series per scheme column; NaN (not blank, which Vega-Lite reads as 0) elsewhere
    assert row["gaussian_test_accuracy"] == row["test_accuracy"] and row["laplace_test_accuracy"] == "NaN"
    none = next(r for r in acc if r["run"] == "none-epsinf-smallcnn-s0")
    assert none["epsilon_achieved"] == "NaN" and all(v != "" for v in none.values())
    assert {r["epsilon"] for r in acc if r["scheme"] in ("none", "clip-only")} == {"inf"}
    ex = read_csv("reports/plots/explain_vs_eps.csv")
    assert len(ex) == len(acc) and {"avg_drop_pct", "laplace_masked_score_pct", "map_agreement"} <= set(ex[0])

    runs = read_csv("reports/runs.csv")
    assert len(runs) == 16
    r0 = next(r for r in runs if r["run"] == "gaussian-eps1-smallcnn-s0")
    assert float(r0["noise_multiplier"]) == 1.1 and r0["test_pred_histogram.1"] == "4"
    assert float(r0["avg_drop_pct"]) == 20.0 and r0["degeneracy.degenerate"] == "0"
    assert float(r0["audit.mia_auc_loss"]) == 0.52 and r0["audit.violation"] == "0"
    assert g1["mia_epsilon_lb"] == 0.1 and "mia_auc" not in metrics["ldp"]["ldp-singh-sikka-eps0.5-smallcnn-s0"]


def test_audit_section_says_violations_loudly(in_built):
    page = Path("reports/index.html").read_text()
    section = page.split('<h2 id="audit">', 1)[1].split("<h2", 1)[0]
    assert 'class="deg">VIOLATION' in section and f"{VIOLATING} (loss)" in section
    assert "gaussian-eps1-smallcnn-s0" in section and "not checked" in section  # baselines: no ε to check
    assert "ldp-singh-sikka" not in section  # not audited: not listed


def test_skipped_families_are_said_not_drawn():
    write_fake_runs(fake_grid())
    rep.report(fake_grid())
    grid = fake_grid(laplace=[], ldp=[], clip_sweep={"epsilon": 1, "clips": []}, train_sizes={"sizes": []},
                     seeds=[0])
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
    with pytest.raises(UserError, match=r"none-epsinf-smallcnn-s0: missing models/baseline/none-epsinf-smallcnn-s0/train.json"):
        rep.report(grid)
    assert not Path("reports").exists()


def test_failure_while_building_leaves_no_partial_report(monkeypatch):
    grid = fake_grid()
    write_fake_runs(grid)
    rep.report(grid)
    before = {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rep, "fig_cams", boom)
    with pytest.raises(RuntimeError):
        rep.report(grid)
    assert {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()} == before
    assert [p.name for p in Path(".").iterdir() if p.name.startswith(".reports")] == []


def test_the_page_links_the_search_report_only_when_it_exists():
    from dpcam.report import render_html

    grid = fake_grid()
    assert "search/index.html" not in render_html(grid, [], [], [], [], [])
    assert '<a href="search/index.html">' in render_html(grid, [], [], [], [], [], search=True)
