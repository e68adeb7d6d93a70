"""The membership-inference audit: statistics on hand-made numbers, then real attacks on tiny fundus models."""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from typer.testing import CliRunner

from dpcam import audit as A
from dpcam import tracking, train
from dpcam.cli import app
from dpcam.config import GridConfig, PrepareConfig, TrainConfig
from dpcam.errors import UserError
from tests.conftest import make_tiny

# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (3, 200), (199, 200), (1, 1)])
def test_clopper_pearson_matches_scipys_exact_interval(k, n):
    lo, hi = A.clopper_pearson(k, n, 0.95)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert float(lo) == pytest.approx(ci.low, abs=1e-12) and float(hi) == pytest.approx(ci.high, abs=1e-12)


def test_clopper_pearson_closed_forms_and_vectorised():
    n = np.array([10, 100, 1000])
    lo, hi = A.clopper_pearson(np.zeros(3, int), n, 0.95)
    assert np.allclose(hi, 1 - 0.025 ** (1 / n)) and np.all(lo == 0)  # k = 0: upper end 1 − (α/2)^(1/n)
    lo, hi = A.clopper_pearson(n, n, 0.9)
    assert np.allclose(lo, 0.05 ** (1 / n)) and np.all(hi == 1)
    assert A.clopper_pearson(5, 10)[0] == pytest.approx(0.187086, abs=1e-6)  # the textbook 5/10 interval


def test_roc_counts_and_metrics_on_hand_made_scores():
    member, non = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.65, 0.4, 0.3, 0.2])
    t, tp, fp = A.roc_counts(member, non)
    assert t[0] == np.inf and tp[0] == fp[0] == 0
    assert list(t[1:5]) == [0.9, 0.8, 0.7, 0.65] and list(tp[:6]) == [0, 1, 2, 3, 3, 4] and list(fp[:6]) == [0, 0, 0, 0, 1, 1]
    assert tp[-1] == 4 and fp[-1] == 4
    r = A.attack_metrics("x", member, non, member, non, delta=0.0, confidence=0.95)
    assert r.metrics["auc"] == pytest.approx(15 / 16)  # 0.6 < 0.65 is the one pair out of 16 ranked wrong
    # best balanced accuracy on the selection half: t = 0.7 (TPR 3/4, FPR 0) ties t = 0.6; the first is kept
    assert r.metrics["balanced_accuracy"] == pytest.approx((0.75 + 1) / 2) == r.metrics["balanced_accuracy_oracle"]
    assert r.metrics["tpr_at_fpr_0.01"] == 0.75 and r.metrics["tpr_at_fpr_0.001"] == 0.75
    # separated vs identical score sets
    assert A.attack_metrics("x", member + 1, non, member + 1, non, 0.0, 0.95).metrics["auc"] == 1.0
    same = A.attack_metrics("x", non, non, non, non, 0.0, 0.95).metrics
    assert same["auc"] == 0.5 and same["epsilon_lb"] == 0.0 and same["balanced_accuracy"] == 0.5


def test_threshold_is_chosen_on_the_selection_half_only():
    rng = np.random.default_rng(0)
    sel_m, sel_n = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    ev = rng.normal(0, 1, 200), rng.normal(0, 1, 200)  # no signal on the evaluation half
    r = A.attack_metrics("x", sel_m, sel_n, *ev, delta=1e-5, confidence=0.95).metrics
    assert r["epsilon_lb"] == 0.0 and abs(r["auc"] - 0.5) < 0.1  # selection-half leakage is not reported
    assert r["tp"] == int((ev[0] >= r["threshold"]).sum()) and r["fp"] == int((ev[1] >= r["threshold"]).sum())


def test_epsilon_lower_bound_by_hand():
    n, d = 100, 1e-5
    lo = 0.025 ** (1 / n)  # CP lower end of 100/100, upper end of 0/100 is 1 − lo
    assert float(A.epsilon_lower_bound(n, 0, n, n, d)) == pytest.approx(math.log((lo - d) / (1 - lo)))

    def cp(k):
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        return ci.low, ci.high

    # TPR 1, FPR 0.5: the second form wins: log((1 − FPR_hi − δ) / (1 − TPR_lo))
    tpr_lo, fpr_hi = cp(n)[0], cp(50)[1]
    want = max(math.log((tpr_lo - d) / fpr_hi), math.log((1 - fpr_hi - d) / (1 - tpr_lo)))
    assert want == pytest.approx(math.log((1 - fpr_hi - d) / (1 - tpr_lo)))
    assert float(A.epsilon_lower_bound(n, 50, n, n, d)) == pytest.approx(want)
    # TPR 0.5, FPR 0: the first form wins
    tpr_lo, fpr_hi = cp(50)[0], cp(0)[1]
    assert float(A.epsilon_lower_bound(50, 0, n, n, d)) == pytest.approx(math.log((tpr_lo - d) / fpr_hi))
    # no better than chance: no positive bound
    assert float(A.epsilon_lower_bound(50, 50, n, n, d)) < 0
    # vectorised over thresholds
    assert A.epsilon_lower_bound(np.array([n, 50]), np.array([0, 50]), n, n, d).shape == (2,)


def test_allowed_tpr_line_by_hand():
    out = A.allowed_tpr([0.0, 0.01, 0.5, 1.0], [1.0], [1e-5])
    assert out[0] == pytest.approx(1e-5) and out[1] == pytest.approx(math.e * 0.01 + 1e-5)
    assert out[2] == pytest.approx(1 - math.exp(-1) * (0.5 - 1e-5))  # the symmetric constraint binds
    assert out[3] == 1.0


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 4)])
def test_pld_curve_is_the_exact_gaussian_trade_off(sigma, steps):
    """Without subsampling, T Gaussian steps are μ-GDP with μ = √T/σ: TPR = Φ(Φ⁻¹(FPR) + μ) exactly."""
    fpr = np.array([1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9])
    exact = norm.cdf(norm.ppf(fpr) + math.sqrt(steps) / sigma)
    curve = A.allowed_tpr(fpr, *A.privacy_profile("gaussian", sigma, 1.0, steps, 1e-5))
    assert np.all(curve >= exact - 1e-9) and np.all(curve <= exact + 1e-4)  # a valid, tight upper bound


def test_pld_curve_is_the_exact_laplace_trade_off():
    """Laplace with ε = 1/λ (Dong, Roth & Su 2022): TPR = e^ε·α, 1 − e^−ε/(4α), 1 − e^−ε(1 − α) by region."""
    lam = 2.0
    eps = 1 / lam
    fpr = np.array([1e-3, 0.1, 0.3, 0.5, 0.9])
    exact = np.where(fpr < math.exp(-eps) / 2, math.exp(eps) * fpr,
                     np.where(fpr <= 0.5, 1 - math.exp(-eps) / (4 * fpr), 1 - math.exp(-eps) * (1 - fpr)))
    curve = A.allowed_tpr(fpr, *A.privacy_profile("laplace", lam, 1.0, 1, 1e-5))
    assert np.all(curve >= exact - 1e-9) and np.all(curve <= exact + 1e-3)


def test_subsampled_profile_agrees_with_the_accountant():
    from dpcam.privacy.accounting import gaussian_epsilon

    eps, deltas = A.privacy_profile("gaussian", 1.0, 0.1, 100, 1e-5)
    assert A._pld_epsilon((eps, deltas), 1e-5) == pytest.approx(gaussian_epsilon(1.0, 0.1, 100, 1e-5), rel=0.01)
    # the curve is far tighter than the ε line at this ε (≈ 7): TPR at FPR 1% ≤ 0.15, the line allows 1
    assert A.allowed_tpr([0.01], eps, deltas)[0] < 0.15 < A.allowed_tpr([0.01], [7.0], [1e-5])[0]


def test_check_points_flags_a_hand_made_violation():
    per = A.check_points({"ok": (0.5, 0.6), "bad": (0.01, 0.5)}, epsilon=1.0, delta=1e-5)
    assert per["ok"]["violation"] is False and per["ok"]["within_pld"] is None
    assert per["bad"]["violation"] is True and per["bad"]["allowed_tpr_line"] == pytest.approx(math.e * 0.01 + 1e-5)
    # inside the (ε, δ) line but outside a (tighter) profile curve: still a violation
    profile = (np.array([0.1]), np.array([1e-5]))
    per = A.check_points({"p": (0.2, 0.4)}, epsilon=1.0, delta=1e-5, profile=profile)["p"]
    assert per["within_line"] and not per["within_pld"] and per["violation"]


def test_members_are_the_images_the_run_trained_on_and_class_matched():
    from dpcam.data.store import load_dataset

    data = load_dataset(make_tiny(n=300))
    used = data.split("train").subset(50).indices  # what train.fit trains on with train_size 50
    members, non = A.sample_groups(data, 1000, seed=3, train_size=50)
    assert set(members) <= set(used) and set(non) <= set(data.split("test").indices)
    assert members.size == non.size == 50 and np.array_equal(np.bincount(data.labels[members]), np.bincount(data.labels[non]))
    m2, _ = A.sample_groups(data, 20, seed=3)
    assert m2.size == 20 and set(m2) <= set(data.split("train").indices)
    with pytest.raises(UserError, match="at least 10 class-matched"):
        A.sample_groups(load_dataset(make_tiny(name="few", n=30)), 1000, 0)


# ------------------------------------------------------------------------------------------ real models

FUNDUS_SPLIT = {"train": 0.3, "val": 0.05, "test": 0.65}


def trained(name: str, **kw) -> str:
    """Fit on the tiny fundus set; save like train.run does (model, train.json with an MLflow run id), minus model logging."""
    cfg = TrainConfig(dataset="fundus", model="smallcnn", device="cpu", keep_best=False, name=name, **kw)
    res = train.fit(cfg, progress=False)
    out = Path("models") / name
    train.save_model(res.model, cfg, train.open_data(cfg), out)
    with tracking.run("fundus", name) as run_id:
        pass
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.metrics.items()}
    (out / "train.json").write_text(json.dumps({**metrics, "run_name": name, "mlflow_run_id": run_id}))
    return name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Built-in synthetic fundus (200 images, 32 px, 60 to train): an overfit non-private model and a DP one."""
    import os

    from dpcam.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("audit")
    old = os.getcwd()
    os.chdir(root)
    try:
        prepare_synthetic(PrepareConfig(dataset="fundus", size=32, synthetic={"n": 200}, split=FUNDUS_SPLIT, workers=1))
        overfit = trained("overfit", scheme="none", epochs=60, optimizer="adam", lr=3e-3, batch_size=30)
        dp = trained("dp", scheme="gaussian", epsilon=1.0, delta=1e-3, epochs=3, batch_size=10, lr=0.5)
    finally:
        os.chdir(old)
    return root, overfit, dp


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs[0])
    return runs[1], runs[2]


def cfg(**kw) -> A.AuditConfig:
    return A.AuditConfig(device="cpu", **kw)


def _mlflow_run(name):
    import mlflow

    run_id = json.loads((Path("models") / name / "train.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.get_run(run_id)


def test_overfit_model_leaks_and_its_outputs_are_written(in_runs):
    overfit, _ = in_runs
    r = A.audit_run(overfit, cfg(), progress=False)
    assert r["members"] == r["non_members"] == 60 and r["evaluation_members"] == 30
    assert r["member_loss"] < r["non_member_loss"] and r["member_accuracy"] > r["non_member_accuracy"]
    assert r["mia_auc_loss"] > 0.8 and r["mia_auc"] >= r["mia_auc_loss"]
    assert set(r["attacks"]) == set(A.ATTACKS) and r["attacks"]["loss"]["member_when"] == "lower loss"
    assert 0 < r["mia_epsilon_lb"] <= r["epsilon_lb_max_detectable"]
    assert r["check"]["done"] is False and r["violation"] is False  # ε = ∞: nothing to check, and it says so
    saved = json.loads(Path("audits/overfit/audit.json").read_text())
    assert saved["mia_auc_loss"] == r["mia_auc_loss"] and any("one-model heuristic" in n for n in saved["notes"])
    assert Path("audits/overfit/roc.png").read_bytes()[:4] == b"\x89PNG"
    logged = _mlflow_run(overfit)
    assert logged.data.metrics["mia_auc_loss"] == pytest.approx(r["mia_auc_loss"])
    assert logged.data.metrics["mia_violation"] == 0.0 and logged.data.tags["dpcam.audit_violation"] == "false"
    assert logged.info.status == "FINISHED"


def test_dp_model_stays_within_its_bound(in_runs, caplog):
    _, dp = in_runs
    with caplog.at_level(logging.ERROR, logger="dpcam.audit"):
        r = A.audit_run(dp, cfg(), progress=False)
    assert r["violation"] is False and not caplog.records
    assert r["check"]["bound"] == "pld-curve+eps-delta-line" and r["check"]["violations"] == []
    assert all(row["within_line"] and row["within_pld"] for row in r["check"]["per_attack"].values())
    assert r["mia_epsilon_lb"] <= r["privacy"]["epsilon"]
    # the profile rebuilt from σ, q and steps gives back the accountant's ε (PRV) to ~1 %
    assert r["check"]["pld_epsilon_at_delta"] == pytest.approx(r["privacy"]["epsilon"], rel=0.03)
    assert _mlflow_run(dp).data.tags["dpcam.audit_check"] == "pld-curve+eps-delta-line"


def test_a_model_that_beats_its_claimed_epsilon_is_reported_loudly(in_runs, caplog):
    """The overfit model passed off as ε = 0.05: the audit must catch it (ERROR log, audit.json, MLflow tag, CLI)."""
    overfit, _ = in_runs
    shutil.copytree(Path("models") / overfit, Path("models/claimed"), dirs_exist_ok=True)
    t = json.loads(Path("models/claimed/train.json").read_text())
    t.update(scheme="gaussian", epsilon=0.05, delta=1e-5, noise_multiplier=None)
    Path("models/claimed/train.json").write_text(json.dumps(t))
    with caplog.at_level(logging.ERROR, logger="dpcam.audit"):
        r = A.audit_run("claimed", cfg(attacks=["loss", "input-gradient"]), progress=False)
    assert r["violation"] is True and r["check"]["bound"] == "eps-delta-line" and "loss" in r["check"]["violations"]
    assert any("σ, q or steps" in n for n in r["notes"])
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "AUDIT VIOLATION" in errors[0].getMessage() and "claimed" in errors[0].getMessage()
    assert json.loads(Path("audits/claimed/audit.json").read_text())["violation"] is True
    assert _mlflow_run("claimed").data.tags["dpcam.audit_violation"] == "true"
    res = CliRunner().invoke(app, ["audit", "claimed", "--attack", "loss", "--device", "cpu", "--fail-on-violation"])
    assert res.exit_code == 1 and "VIOLATION: loss" in res.output
    # σ, q and steps that cannot give ε = 0.05: the rebuilt PLD says so, and its curve is checked
    t.update(noise_multiplier=0.8, sample_rate=0.5, steps=100)
    Path("models/claimed/train.json").write_text(json.dumps(t))
    r = A.audit_run("claimed", cfg(attacks=["loss"]), progress=False)
    assert r["violation"] and r["check"]["bound"] == "pld-curve+eps-delta-line" and r["check"]["pld_epsilon_at_delta"] > 1
    assert any("check the run's accounting" in n for n in r["notes"])


def test_audit_family_mirrors_the_explain_stage(in_runs):
    overfit, _ = in_runs
    grid = GridConfig(baselines=["none"], gaussian=[], laplace=[], clip_sweep={"clips": []})
    with pytest.raises(UserError, match="grid run none-epsinf-smallcnn-s0: no trained model"):
        A.audit_family("baseline", grid, cfg())
    with pytest.raises(UserError, match="unknown grid family 'nope'"):
        A.audit_family("nope", grid, cfg())
    assert A.audit_family("ldp", grid, cfg()) == [] and Path("audits/ldp").is_dir()
    shutil.copytree(Path("models") / overfit, Path("models/baseline/none-epsinf-smallcnn-s0"))
    Path("audits/baseline/none-epsinf-smallcnn-s0").mkdir(parents=True)
    Path("audits/baseline/none-epsinf-smallcnn-s0/stale.txt").write_text("old")
    [r] = A.audit_family("baseline", grid, cfg(attacks=["loss"]))
    folder = Path("audits/baseline/none-epsinf-smallcnn-s0")
    assert sorted(p.name for p in folder.iterdir()) == ["audit.json", "roc.png"] and r["run_name"] == folder.name


def test_audit_grid_checks_every_model_before_writing(in_runs):
    overfit, _ = in_runs
    grid = GridConfig(baselines=["none"], gaussian=[1], laplace=[], clip_sweep={"clips": []})
    for folder in ("models/baseline", "audits/baseline"):  # the runs fixture is shared with the family test
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(Path("models") / overfit, Path("models/baseline/none-epsinf-smallcnn-s0"))
    with pytest.raises(UserError, match="grid run gaussian-eps1-smallcnn-s0: no trained model"):
        A.audit_grid(grid, cfg(attacks=["loss"]))
    assert not Path("audits/baseline/none-epsinf-smallcnn-s0").exists()  # nothing half written
    grid = GridConfig(baselines=["none"], gaussian=[], laplace=[], clip_sweep={"clips": []})
    [r] = A.audit_grid(grid, cfg(attacks=["loss"]))
    assert r["run_name"] == "none-epsinf-smallcnn-s0" and Path("audits/baseline/none-epsinf-smallcnn-s0/audit.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit"], "name one RUN, or pass --family"),
        (["audit", "overfit", "--grid"], "(one of them)"),
        (["audit", "--family", "baseline", "--grid"], "(one of them)"),
        (["audit", "nope"], "unknown run 'nope'"),
        (["audit", "overfit", "--attack", "lira"], "unknown attack 'lira'"),
        (["audit", "overfit", "--max-per-group", "5"], "audit.max_per_group = 5"),
        (["audit", "--family", "nope"], "unknown grid family 'nope'"),
    ],
)
def test_bad_audit_input_is_one_line(in_runs, args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ") and message in res.output
    assert len(res.output.strip().splitlines()) == 1
