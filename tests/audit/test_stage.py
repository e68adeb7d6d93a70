"""The audit stage on real attacks against tiny fundus models: outputs, the check, families, the grid, the CLI."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpcam import audit as A
from dpcam import saved, tracking
from dpcam.cli import app
from dpcam.config import AuditConfig, GridConfig, PrepareConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.train import fit as train_fit

# ------------------------------------------------------------------------------------------ real models

FUNDUS_SPLIT = {"train": 0.3, "val": 0.05, "test": 0.65}


def trained(name: str, **kw) -> str:
    """Fit on the tiny fundus set; save like dpcam.train.stage.run does (model, train.json with an MLflow run id),
    minus model logging."""
    cfg = TrainConfig(dataset="fundus", model="smallcnn", device="cpu", keep_best=False, name=name, **kw)
    res = train_fit.fit(cfg, progress=False)
    out = Path("models") / name
    saved.save_model(res.model, cfg, train_fit.open_data(cfg), out)
    with tracking.run("fundus", name) as run_id:
        pass
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.metrics.items()}
    (out / "train.json").write_text(json.dumps({**metrics, "run_name": name, "mlflow_run_id": run_id}))
    return name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Built-in synthetic fundus (200 images, 32 px, 60 to train): an overfit non-private model and a DP one."""
    import os

    from dpcam.data.synthetic_stage import prepare_synthetic

    root = tmp_path_factory.mktemp("audit")
    old = os.getcwd()
    os.chdir(root)
    try:
        prepare_synthetic(
            PrepareConfig(
                dataset="fundus", size=32, synthetic={"n": 200, "lesion_scale": 2.0}, split=FUNDUS_SPLIT, workers=1
            )
        )
        # small batches, constant lr: the 3-block smallcnn memorises its 60 training images (loss ~0.1)
        overfit = trained(
            "overfit", scheme="none", epochs=100, optimizer="adam", lr=1e-2, batch_size=10, schedule="constant"
        )
        dp = trained("dp", scheme="gaussian", epsilon=1.0, delta=1e-3, epochs=3, batch_size=10, lr=0.5)
    finally:
        os.chdir(old)
    return root, overfit, dp


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs[0])
    return runs[1], runs[2]


def cfg(**kw) -> AuditConfig:
    return AuditConfig(device="cpu", **kw)


def _mlflow_run(name):
    import mlflow

    run_id = json.loads((Path("models") / name / "train.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.get_run(run_id)


@pytest.mark.slow
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


@pytest.mark.slow
def test_dp_model_stays_within_its_bound(in_runs, caplog):
    _, dp = in_runs
    with caplog.at_level(logging.ERROR, logger="dpcam.audit"):
        r = A.audit_run(dp, cfg(), progress=False)
    assert r["violation"] is False and not caplog.records
    assert r["check"]["bound"] == "pld-curve+eps-delta-line" and r["check"]["violations"] == []
    assert all(row["within_line"] and row["within_pld"] for row in r["check"]["per_attack"].values())
    # checked for the replace-one relation of the experiment, the add/remove curve only recorded beside it
    check = r["check"]
    assert check["relation"] == "replace-one" and r["privacy"]["relation"] == "add-or-remove-one"
    assert check["epsilon_replace_one"] > 1.3 * r["privacy"]["epsilon"] and check["delta_replace_one"] == 1e-3
    assert all(row["allowed_tpr_add_remove"] <= row["allowed_tpr_pld"] for row in check["per_attack"].values())
    assert r["mia_epsilon_lb"] <= check["epsilon_replace_one"]
    detectable = any("largest ε these sample sizes can show" in n for n in r["notes"])
    assert detectable == (check["epsilon_replace_one"] >= r["epsilon_lb_max_detectable"])
    # the profile rebuilt from σ, q and steps gives back the accountant's ε (PRV) to ~1 %
    assert r["check"]["pld_epsilon_at_delta"] == pytest.approx(r["privacy"]["epsilon"], rel=0.03)
    logged = _mlflow_run(dp).data
    assert logged.tags["dpcam.audit_check"] == "pld-curve+eps-delta-line"
    assert logged.tags["dpcam.audit_relation"] == "replace-one"
    assert logged.metrics["mia_check_epsilon_replace_one"] == pytest.approx(check["epsilon_replace_one"])


@pytest.mark.slow
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
    assert (
        r["violation"] and r["check"]["bound"] == "pld-curve+eps-delta-line" and r["check"]["pld_epsilon_at_delta"] > 1
    )
    assert any("check the run's accounting" in n for n in r["notes"])


@pytest.mark.slow
def test_audit_family_mirrors_the_explain_stage(in_runs):
    overfit, _ = in_runs
    grid = GridConfig(
        family_seeds={},
        seeds=[0],
        baselines=["none"],
        gaussian=[],
        laplace=[],
        clip_sweep={"clips": []},
        ldp=[],
        train_sizes={"sizes": []},
        finetune={"schemes": []},
        schedules=None,
    )
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


@pytest.mark.slow
def test_audit_grid_checks_every_model_before_writing(in_runs):
    overfit, _ = in_runs
    grid = GridConfig(
        family_seeds={},
        seeds=[0],
        baselines=["none"],
        gaussian=[1],
        laplace=[],
        clip_sweep={"clips": []},
        ldp=[],
        train_sizes={"sizes": []},
        finetune={"schemes": []},
        schedules=None,
    )
    for folder in ("models/baseline", "audits/baseline"):  # the runs fixture is shared with the family test
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(Path("models") / overfit, Path("models/baseline/none-epsinf-smallcnn-s0"))
    with pytest.raises(UserError, match="grid run gaussian-eps1-smallcnn-s0: no trained model"):
        A.audit_grid(grid, cfg(attacks=["loss"]))
    assert not Path("audits/baseline/none-epsinf-smallcnn-s0").exists()  # nothing half written
    grid = GridConfig(
        family_seeds={},
        seeds=[0],
        baselines=["none"],
        gaussian=[],
        laplace=[],
        clip_sweep={"clips": []},
        ldp=[],
        train_sizes={"sizes": []},
        finetune={"schemes": []},
        schedules=None,
    )
    [r] = A.audit_grid(grid, cfg(attacks=["loss"]))
    assert (
        r["run_name"] == "none-epsinf-smallcnn-s0"
        and Path("audits/baseline/none-epsinf-smallcnn-s0/audit.json").is_file()
    )


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
@pytest.mark.slow
def test_bad_audit_input_is_one_line(in_runs, args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ") and message in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_laplace_paper_is_not_checked_because_it_has_no_guarantee():
    from types import SimpleNamespace

    from dpcam.audit import stage

    t = SimpleNamespace(notes=[], train_json=Path("train.json"), name="laplace-paper-nominal5-smallcnn-s0")
    why = stage._unchecked(t, "laplace-paper")
    assert "no privacy guarantee" in why and "no ε to check" in why and t.notes == [f"no check against a bound: {why}"]
