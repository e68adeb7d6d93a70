"""dpcam.train.family: a family of grid runs, kept by stamp, stale runs removed."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpcam import layout, tracking
from dpcam.cli import app
from dpcam.config import TrainConfig
from dpcam.errors import UserError
from dpcam.train import family as train_family
from dpcam.train import stage as train_stage
from tests.conftest import make_tiny, tiny_grid
from tests.train.conftest import _status, cfg


@pytest.mark.slow
def test_run_family_trains_every_run_of_the_family_into_its_folder(tiny):
    grid = tiny_grid(gaussian=[2, 4])
    results = train_family.run_family("gaussian", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert [r["run_name"] for r in results] == ["gaussian-eps2-smallcnn-s0", "gaussian-eps4-smallcnn-s0"]
    for r in results:
        saved = json.loads(Path(f"models/gaussian/{r['run_name']}/train.json").read_text())
        assert saved["epsilon"] == pytest.approx(r["epsilon"]) and saved["epsilon"] <= saved["target_epsilon"] + 1e-6
        assert layout.run_dir(r["run_name"]) == Path(f"models/gaussian/{r['run_name']}")
    small = train_family.run_family("train-size", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert small[0]["train_size"] == 40
    assert train_family.run_family("ldp", grid, cfg(), progress=False) == [] and Path("models/ldp").is_dir()
    with pytest.raises(UserError, match="unknown grid family 'gausian'"):
        train_family.run_family("gausian", grid, cfg())


def test_a_grid_eps_no_noise_reaches_is_refused_before_any_run_trains(tiny):
    grid = tiny_grid(gaussian=[2, 1e-9])
    with pytest.raises(UserError, match=r"gaussian-eps1e-09-smallcnn-s0: target ε = 1e-09 .* cannot be reached"):
        train_family.run_family("gaussian", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert not Path("models/gaussian/gaussian-eps2-smallcnn-s0/train.json").exists()  # ε = 2 was not trained first


@pytest.mark.slow
def test_rerunning_a_family_redoes_only_the_runs_without_complete_outputs(tmp_path, monkeypatch):
    """A stage that failed part-way (a run raised, a worker was killed) is rerun by `dvc repro` (the train
    outputs are `persist`): finished runs of the same configuration, code and data are kept, the rest trained."""
    from dpcam.config import GridConfig

    monkeypatch.chdir(tmp_path)
    make_tiny()
    grid = GridConfig(
        models=["smallcnn"],
        seeds=[0, 1],
        gaussian=[2],
        baselines=["none"],
        family_seeds={},
        executor="serial",
        schedules=None,
    )
    base = TrainConfig(dataset="tiny", model="smallcnn", epochs=1, batch_size=32, lr=0.5, device="cpu", delta=1e-3)
    first = {r.run_name: r for r in train_family.run_family("gaussian", grid, base, progress=False)}
    kept, lost = (Path(f"models/gaussian/{n}") for n in sorted(first))
    kept_inode = (kept / "model.pt").stat().st_ino
    (lost / "train.json").unlink()  # this run did not finish
    again = {r.run_name: r for r in train_family.run_family("gaussian", grid, base, progress=False)}
    assert (kept / "model.pt").stat().st_ino == kept_inode  # not trained again
    assert (lost / "train.json").is_file() and again[lost.name].mlflow_run_id != first[lost.name].mlflow_run_id
    assert again[lost.name].val_curve == first[lost.name].val_curve  # the same seed gives the same run
    assert again[kept.name] == first[kept.name]
    # another configuration: every run is trained again; a run no longer in the grid is removed
    changed = train_family.run_family(
        "gaussian", grid.model_copy(update={"seeds": [0]}), base.model_copy(update={"lr": 0.4})
    )
    assert [r.run_name for r in changed] == [kept.name] and changed[0].mlflow_run_id != first[kept.name].mlflow_run_id
    assert not lost.exists()


def test_a_runs_stamp_follows_the_code_the_train_stage_runs_only(tmp_path, monkeypatch):
    """Editing a report module keeps every finished run (the stamp hashes the train stage's import closure, the
    files dvc.yaml lists as its deps); editing the privacy engine's planner retrains them. On a copy of dpcam."""
    import shutil

    from dpcam import codegraph

    src = tmp_path / "src"
    shutil.copytree(codegraph.SRC / "dpcam", src / "dpcam", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codegraph, "SRC", src)

    def digest() -> bytes:
        codegraph.imports.cache_clear()
        train_family._code_digest.cache_clear()
        return train_family._code_digest()

    try:
        before = digest()
        with open(src / "dpcam/report/page.py", "a") as f:
            f.write("# a report-only edit\n")
        assert digest() == before
        with open(src / "dpcam/privacy/plan.py", "a") as f:
            f.write("# an edit of code the train stage runs\n")
        assert digest() != before
    finally:
        monkeypatch.undo()
        codegraph.imports.cache_clear()
        train_family._code_digest.cache_clear()


@pytest.mark.slow
def test_a_grid_that_drops_a_family_removes_its_runs_saying_how_many_and_an_empty_seed_list_is_refused(tiny):
    """Issue 25, case 4: `grid.seeds: []` made `dpcam train --family gaussian` exit 0 and delete every trained
    model of the family. An empty seeds (or models) list is refused before anything is touched; a family the
    grid drops (its own list emptied) has its runs removed, and the command says how many."""
    import yaml

    grid = tiny_grid(gaussian=[2, 5], executor="serial")
    base = cfg(scheme="gaussian", epochs=1, delta=1e-3)
    trained = sorted(r.run_name for r in train_family.run_family("gaussian", grid, base, progress=False))
    before = {p: p.read_bytes() for p in sorted(Path("models/gaussian").rglob("*")) if p.is_file()}
    Path("params.yaml").write_text(yaml.safe_dump({"grid": {**grid.model_dump(mode="json"), "seeds": []}}))
    res = CliRunner().invoke(app, ["train", "--family", "gaussian"])
    assert res.exit_code == 2 and res.output.startswith("error: params.yaml: grid.seeds = []: empty; "), res.output
    assert {p: p.read_bytes() for p in sorted(Path("models/gaussian").rglob("*")) if p.is_file()} == before
    with pytest.warns(UserWarning, match=r"family gaussian: removed 2 trained runs from models/gaussian .*"):
        assert train_family.run_family("gaussian", grid.model_copy(update={"gaussian": []}), base, progress=False) == []
    assert [p.name for p in Path("models/gaussian").iterdir()] == [] and len(trained) == 2


@pytest.mark.slow
def test_a_run_a_killed_process_left_running_is_ended_killed_when_the_stage_reruns_it(tiny):
    """Issue 25, case 7: a SIGKILLed run stayed RUNNING in MLflow beside its retrained copy. A killed process
    leaves its run's id in the run folder (and its checkpoint); the stage that trains the run again ends it."""
    from mlflow.tracking import MlflowClient

    grid, base = tiny_grid(executor="serial"), cfg(scheme="gaussian", epochs=1, delta=1e-3)
    folder = Path("models/gaussian/gaussian-eps2-smallcnn-s0")
    folder.mkdir(parents=True)
    tracking._setup()
    killed = MlflowClient().create_run(tracking._experiment_id("tiny"), run_name=folder.name).info.run_id
    (folder / train_stage.RUN_ID_FILE).write_text(killed + "\n")  # what a SIGKILLed run leaves
    (record,) = train_family.run_family("gaussian", grid, base, progress=False)
    assert _status(killed) == "KILLED" and _status(record.mlflow_run_id) == "FINISHED"
    assert not (folder / train_stage.RUN_ID_FILE).exists()  # a run that ended leaves no id file behind
