"""End to end: the repository's dvc.yaml on a tiny profile, in a temporary git clone.

One `dvc repro` of every stage (100 images of 16 px, one epoch per run), then what users do
next: `dvc metrics show`, `dvc status`, and which stages a params change invalidates.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "prepare": {
        "dataset": "tiny-fundus",
        "format": "synthetic",
        "size": 16,
        "seed": 0,
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "workers": 1,
        "synthetic": {"n": 100, "balance": "uniform", "lesion_scale": 2.0},
        "public": {"n": 100, "seed": 2, "source": None},
    },
    "ldp": {
        "mechanisms": ["singh-sikka"],
        "epsilons": [1],
        "delta": 1.0e-5,
        "seed": 0,
        "secure": False,
        "dp_pix": {"b": 4, "m": 1},
    },
    "train": {
        "dataset": "tiny-fundus",
        "model": "smallcnn",
        "delta": 1.0e-5,
        "clip": 1.0,
        "lr": 0.5,
        "epochs": 1,
        "batch_size": 12,
        "device": "cpu",
    },
    "profile": "tiny",
    "grid": {
        "name": "tiny",
        "models": ["smallcnn"],
        "seeds": [0],
        "gaussian": [1, 5],
        "laplace": [5],
        "laplace_clip": 10,
        "laplace_lr": 0.1,
        "baselines": ["none", "clip-only"],
        "ldp": ["singh-sikka-eps1"],
        "clip_sweep": {"epsilon": 1, "clips": [10]},
        "train_sizes": {"sizes": [40], "gaussian": [1], "none": True, "epochs": None},
        "nonprivate": {"optimizer": "adam", "lr": 0.003, "batch_size": 12, "epochs": 1},
        "schedules": {  # one DP schedule for both ε: its references split what ε costs
            "all": {"epochs": 1, "batch_size": 12, "lr": 0.5, "ema": 0.9, "reference_lr": 0.1}
        },
        "protocol": "tuned",
        "family_seeds": {"laplace": [0]},
        "overrides": {},
        "finetune": {
            "schemes": ["none", "gaussian", "laplace"],
            "weights": None,
            "trainable": "head",
            "epochs": 1,
            "batch_size": 12,
            "lr": 0.5,
            "clip": 1.0,
            "laplace_lr": 0.5,
            "laplace_clip": 5.0,
            "nonprivate": {"lr": 0.1, "batch_size": 12, "epochs": 1},
        },
    },
    "explain": {"max_images": 6, "batch_size": 6, "steps": 2, "grid_images": 2, "device": "cpu"},
    "audit": {"max_per_group": 10, "batch_size": 10, "device": "cpu"},
    "verdict": {"marks": "holm"},
}


def _run(args, cwd, env):
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    root = tmp_path_factory.mktemp("clone")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))  # the stages' code deps
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], root, env)
    _run([BIN / "dvc", "init", "-q"], root, env)
    _run([BIN / "dvc", "config", "core.analytics", "false"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny profile"], root, env)
    out = _run([BIN / "dvc", "repro"], root, env)
    return root, env, out


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_the_report(repro):
    root, env, out = repro
    for stage in (
        "prepare",
        "prepare-public",
        "ldp@singh-sikka-1",
        "ldp-figure",
        "train-gaussian",
        "train-laplace-paper",
        "train-public",
        "train-finetune-laplace",
        "explain-finetune-gaussian",
        "explain-train-size",
        "audit",
        "report",
    ):
        assert f"Running stage '{stage}'" in out
    runs = [p.parent.name for p in (root / "models").glob("*/*/model.json")]
    # baselines (∞ tuned, and ∞ and clip-only with the schedule), gaussian, laplace, ldp, clip-sweep (C = 10 with lr
    # fixed and with lr·C held), train-size, laplace-paper, the public trunk, 3 fine-tunes
    assert len(runs) == 3 + 2 + 1 + 1 + 2 + 2 + 1 + 1 + 3
    assert {"none-epsinf-sched-all-smallcnn-s0", "clip-only-epsinf-sched-all-smallcnn-s0"} <= set(runs), runs
    assert any(r.startswith("gaussian-eps1-clip10-held") for r in runs), runs
    verdict = (root / "reports/verdict.md").read_text()
    assert "What ε costs in accuracy (ε − ∞ = noise + clipping + budget" in verdict and "| ε = 1 (all) |" in verdict
    assert (root / "reports/figures/fig_cost_split.png").is_file()
    paper = json.loads(next((root / "models").glob("laplace-paper/*/train.json")).read_text())
    assert paper["guarantee"] == "none" and paper["epsilon"] is None
    html = (root / "reports/index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#:]+)"', html)
    assert refs and all((root / "reports" / r).is_file() for r in refs), refs
    for name in runs:  # the page names every run and its MLflow run id
        train = json.loads(next((root / "models").glob(f"*/{name}/train.json")).read_text())
        assert name in html and train["mlflow_run_id"] in html


def test_metrics_show_lists_the_final_metrics_and_nothing_is_stale(repro):
    root, env, _ = repro
    shown = json.loads(_run([BIN / "dvc", "metrics", "show", "--json"], root, env))
    text = json.dumps(shown)
    assert "reports/metrics.json" in text and "expl_ok_from_eps" in text and "d_acc_e1" in text
    assert (
        "up to date" in _run([BIN / "dvc", "status"], root, env).lower()
        or _run([BIN / "dvc", "status", "--json"], root, env).strip() == "{}"
    )


def test_dvc_shows_the_verdict_in_few_columns_and_draws_plots_offline(repro):
    """`dvc metrics show` / `dvc exp show` get the verdict's few numbers (a column each); `dvc plots show` with the
    template `make install` writes (scripts/offline_plots.py) loads nothing from the network."""
    root, env, _ = repro
    shown = json.loads(_run([BIN / "dvc", "metrics", "show", "--json"], root, env))
    (metrics,) = [f["data"] for rev in shown.values() for f in rev["data"].values()]
    assert len(metrics) <= 40 and max(map(len, metrics)) <= 20
    assert {"seeds", "d_acc_e1", "claim_a", "acc_ok_from_eps"} <= set(metrics)  # "none", not a null DVC would drop
    template = REPO / ".dvc/plots/offline.html"
    assert template.is_file(), "run `make install` (scripts/offline_plots.py) first"
    _run([BIN / "dvc", "plots", "show", "--html-template", template, "-o", root / "plots_offline"], root, env)
    page = (root / "plots_offline/index.html").read_text()
    assert not re.findall(r"<script[^>]+src=", page) and "https://cdn" not in page
    assert page.count("vegaEmbed(") >= 2 and 'var e="5.20.2"' in page  # both plots, Vega inlined


def test_an_explain_setting_invalidates_only_explain_and_report(repro):
    root, env, _ = repro
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["explain"]["steps"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(_run([BIN / "dvc", "status", "--json"], root, env)))
    finally:
        (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    assert changed and all(s.startswith("explain-") for s in changed), changed
    assert (root / "audits/gaussian/gaussian-eps1-smallcnn-s0/audit.json").is_file()
