"""Shared by the tests of dpcam.train: the tiny config and dataset, MLflow run statuses."""

import pytest

from dpcam import tracking
from dpcam.config import TrainConfig
from tests.conftest import make_tiny


def cfg(**kw) -> TrainConfig:
    base = dict(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.1, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def tiny():
    return make_tiny()


def _status(run_id):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.get_run(run_id).info.status


def _mlflow_runs(experiment: str) -> dict[str, str]:
    """Run name -> status of every run of ``experiment`` in the current folder's store."""
    from mlflow.tracking import MlflowClient

    tracking._setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return {r.info.run_name: r.info.status for r in runs}


TRAIN_ARGS = [
    "--dataset",
    "tiny",
    "--scheme",
    "gaussian",
    "--epsilon",
    "2",
    "--delta",
    "1e-3",
    "--batch-size",
    "32",
    "--device",
    "cpu",
]
