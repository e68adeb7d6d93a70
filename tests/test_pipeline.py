"""dvc.yaml is what dpcam.pipeline writes from the family registry and the code each stage imports."""

from pathlib import Path

import yaml

from dpcam import pipeline
from dpcam.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_current():
    assert (REPO / "dvc.yaml").read_text() == pipeline.render(), "run `python -m dpcam.pipeline --write`"


def test_every_family_has_its_train_and_explain_stage_and_the_audit_covers_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, f in FAMILIES.items():
        assert stages[f"train-{name}"]["cmd"] == f"dpcam train --family {name}"
        assert stages[f"explain-{name}"]["outs"] == [f"metrics/{name}"]
        assert f"models/{name}" in stages["audit"]["deps"] and f"audits/{name}" in stages["audit"]["outs"]
        for key in f.grid_keys:
            assert (
                f"grid.{key}" in stages[f"train-{name}"]["params"]
                and f"grid.{key}" in stages[f"explain-{name}"]["params"]
            )


def test_stage_deps_cover_the_code_each_command_runs():
    """The closure follows function-local imports: the explain stage runs saved.load_model and models."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    explain = set(stages["explain-gaussian"]["deps"])
    assert {
        "src/dpcam/saved.py",
        "src/dpcam/models.py",
        "src/dpcam/data/store.py",
        "src/dpcam/config/__init__.py",
        "src/dpcam/explain/metrics.py",
        "src/dpcam/cli.py",
    } <= explain
    assert "src/dpcam/report/__init__.py" not in explain and "src/dpcam/search/__init__.py" not in explain
    prepare = stages["prepare"]["deps"]
    assert not [d for d in prepare if d.startswith("src/dpcam/tracking/")]  # prepare never logs to MLflow
    for name in ("train-gaussian", "audit", "report"):
        deps = set(stages[name]["deps"])
        missing = [p for p in pipeline.import_closure(pipeline.ENTRIES[name.split("-")[0]]) if p not in deps]
        assert not missing, (name, missing)


def test_a_change_of_a_dp_schedule_reruns_every_train_stage_and_the_baselines_explanations():
    """`dvc exp run -S grid.schedules.long.epochs=...` must retrain: Gaussian runs of any family take their band's
    recipe (a run whose configuration did not change is kept by its stamp), and the references are baseline runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in FAMILIES:
        params = stages[f"train-{name}"]["params"]
        assert "grid.schedules" in params and len(params) == len(set(params)), name
    assert "grid.schedules" in stages["explain-baseline"]["params"] and "grid" in stages["report"]["params"]


def test_reading_a_saved_run_needs_no_training_code():
    """Editing the optimiser, the accountant's engine or the training loop reruns no explain stage, and neither the
    audit (which keeps the accountant's trade-off curves, privacy/profile.py) nor the report."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    training = {"src/dpcam/train/fit.py", "src/dpcam/privacy/engine.py", "src/dpcam/privacy/laplace.py"}
    training |= {"src/dpcam/privacy/precision.py", "src/dpcam/privacy/setup.py"}
    for name, deps in stages.items():
        if name.startswith("explain-"):
            assert not [d for d in deps["deps"] if d.startswith(("src/dpcam/train/", "src/dpcam/privacy/"))]
    for name in ("audit", "report"):
        assert not training & set(stages[name]["deps"]), name
    assert "src/dpcam/privacy/profile.py" in stages["audit"]["deps"]


def test_the_public_set_and_the_fine_tuning_families_are_stages():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pub = stages["prepare-public"]
    assert pub["cmd"] == "dpcam prepare --public" and pub["outs"] == ["data/prepared/${prepare.dataset}-public"]
    assert "data/prepared/${prepare.dataset}" in pub["deps"]  # checked against the private set
    assert stages["train-public"]["deps"][0] == "data/prepared/${prepare.dataset}-public"
    for scheme in ("none", "gaussian", "laplace"):
        train = stages[f"train-finetune-{scheme}"]
        assert train["deps"][:2] == ["data/prepared/${prepare.dataset}", "models/public"]
        assert "grid.finetune" in train["params"] and "grid.laplace" in train["params"]
    assert "src/dpcam/data/public.py" in stages["train-finetune-gaussian"]["deps"]
    params = stages["audit"]["params"]
    assert len(params) == len(set(params)) and "grid.finetune.schemes" not in params  # grid.finetune covers it
