"""dpcam.tracking's runs: resuming, what they log, logged models, runs a killed process left."""

from pathlib import Path

import pytest

from dpcam import tracking


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


def test_a_store_that_cannot_log_datasets_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """An older MLflow server without dataset inputs: one warning line, the run finishes, nothing else lost."""
    import mlflow
    from mlflow.exceptions import MlflowException

    def old_server(*args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-inputs failed with error code 404")

    monkeypatch.setattr(mlflow, "log_input", old_server)
    with tracking.run("exp", "old") as run_id:
        assert tracking.log_dataset("tiny", "ab" * 32, tmp_path, {"split": "train", "images": 3}) is False
        tracking.log_metrics({"acc": 0.5})
    r = tracking.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.metrics == {"acc": 0.5}
    (line,) = [rec.getMessage() for rec in caplog.records if "cannot log the run's dataset" in rec.getMessage()]
    assert "404" in line and "\n" not in line


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_loading_a_logged_model_leaves_the_store_untouched():
    """MLflow downloads a models:/ URI in place for a local store and writes registered_model_meta there."""
    import torch

    model = torch.nn.Linear(4, 2)
    with tracking.run("exp", "m"):
        uri = tracking.log_model(model, input_example=torch.rand(2, 4).numpy())
    artifacts = _listing(Path("mlruns/artifacts"))
    loaded = tracking.load_model(uri)
    assert _listing(Path("mlruns/artifacts")) == artifacts
    x = torch.rand(3, 4)
    assert torch.equal(loaded(x), model(x))


def test_a_run_a_killed_process_left_running_is_ended_killed():
    """Issue 25, case 7: a killed run stayed RUNNING in MLflow beside its retrained copy."""
    import mlflow

    tracking._setup()
    exp = tracking._experiment_id("exp")
    left = mlflow.tracking.MlflowClient().create_run(exp, run_name="killed").info.run_id  # as SIGKILL leaves it
    assert tracking.get_run(left).info.status == "RUNNING"
    assert tracking.end_abandoned(left) is True
    assert tracking.get_run(left).info.status == "KILLED"
    assert tracking.end_abandoned(left) is False  # a run that ended is left as it is
    assert tracking.end_abandoned("0" * 32) is False  # and one the store does not have
