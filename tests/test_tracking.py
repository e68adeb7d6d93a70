import os
from pathlib import Path

import pytest

from dpcam import tracking


def test_default_store_follows_the_current_folder_and_leaks_no_env(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with tracking.run("exp", "first") as first:
        tracking.log_metrics({"m": 1.0})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.chdir(tmp_path / "b")
    with tracking.run("exp", "second"):
        pass
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'b' / 'mlruns' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path / "a")
    assert tracking.get_run(first).data.metrics["m"] == 1.0
    assert (tmp_path / "a/mlruns/mlflow.db").exists() and (tmp_path / "b/mlruns/mlflow.db").exists()


def test_user_store_from_the_environment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.run("exp", "x") as run_id:
        pass
    assert tracking.get_run(run_id).info.status == "FINISHED"
    assert (tmp_path / "team.db").exists() and not Path("mlruns/mlflow.db").exists()


def test_resuming_an_unknown_run_is_one_line(tmp_path):
    from dpcam.errors import UserError

    with pytest.raises(UserError, match="is not in sqlite"):
        with tracking.run("exp", "x", run_id="0" * 32):
            pass


def test_params_are_flattened_and_non_finite_metrics_skipped():
    with tracking.run("exp", "p") as run_id:
        tracking.log_params({"a": {"b": 1}, "c": None})
        tracking.log_metrics({"eps": float("inf"), "acc": 0.5, "flag": True})
    r = tracking.get_run(run_id)
    assert r.data.params == {"a.b": "1", "c": ""}
    assert r.data.metrics == {"acc": 0.5}
