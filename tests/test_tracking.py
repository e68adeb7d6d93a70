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


def test_a_signal_that_mlflow_swallows_still_ends_the_run_killed(monkeypatch):
    """SIGTERM inside an MLflow call that catches every Exception (as signature inference does) is held
    back until the call returns, then raised: the run ends KILLED, not FINISHED."""
    import signal

    import mlflow

    real = mlflow.log_metrics

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes: here, inside the try
                pass
        except Exception:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", swallowing)
    seen = {}
    with pytest.raises(tracking.Terminated, match="SIGTERM"):
        with tracking.run("exp", "t") as run_id:
            seen["id"] = run_id
            tracking.log_metrics({"a": 1.0})
            seen["after"] = True  # not reached: the signal is raised when log_metrics returns
    r = tracking.get_run(seen["id"])
    assert r.info.status == "KILLED" and r.data.metrics == {"a": 1.0} and "after" not in seen
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with it
    with tracking.run("exp", "next") as again:  # nothing of the signal is left for the next run
        pass
    assert tracking.get_run(again).info.status == "FINISHED"


def test_a_signal_dropped_by_code_in_the_run_still_ends_it_killed():
    import signal

    with pytest.raises(tracking.Terminated):
        with tracking.run("exp", "t") as run_id:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
            except BaseException:
                pass
    assert tracking.get_run(run_id).info.status == "KILLED"


def test_a_read_only_store_is_one_line_before_any_work():
    from dpcam.errors import UserError
    from tests.readonly import read_only

    with tracking.run("exp", "first"):
        pass
    with read_only(Path("mlruns/mlflow.db")):
        with pytest.raises(
            UserError, match=r"^MLflow tracking store sqlite:///.*mlflow\.db: cannot start a run"
        ) as err:
            with tracking.run("exp", "second"):
                raise AssertionError("the block must not run")
    assert "\n" not in str(err.value)


def test_a_read_only_artifact_folder_is_refused_before_the_run_starts():
    from dpcam.errors import UserError
    from tests.readonly import read_only

    Path("note.txt").write_text("x")
    with tracking.run("exp", "first"):
        tracking.log_artifact("note.txt")
    with read_only(Path("mlruns/artifacts")):
        with pytest.raises(UserError, match=r"^MLflow artifact folder .*mlruns/artifacts: cannot write \("):
            with tracking.run("exp", "second"):
                raise AssertionError("the block must not run")
    runs = tracking.MlflowClient().search_runs([tracking._experiment_id("exp")])
    assert [r.info.run_name for r in runs] == ["first"]  # no FAILED run left behind


# ------------------------------------------------------------------------------------ many workers, one store


def _log_one_run(folder: str, uri: str | None, k: int) -> str:
    """A worker (its own process): one run with params, 20 metric steps and an artifact, as a training run logs."""
    os.chdir(folder)
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    with tracking.run("shared", f"worker-{k}", tags={"dpcam.worker": k}) as run_id:
        tracking.log_params({"k": k, "lr": 0.1 * k})
        for step in range(20):
            tracking.log_metrics({"loss": 1.0 / (step + 1 + k), "val_accuracy": 0.01 * step}, step=step)
        Path(f"note-{k}.txt").write_text(f"worker {k}")
        tracking.log_artifact(f"note-{k}.txt")
    return run_id


def _workers_log(folder: Path, uri: str | None, workers: int) -> list[str]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if uri is None:
        tracking.ensure_experiment("shared")  # as run_family does before it starts workers on the sqlite store
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_log_one_run, [str(folder)] * workers, [uri] * workers, range(workers)))


def _assert_complete(run_ids: list[str], workers: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids) and len(runs) == workers  # none lost
    for r in runs:
        k = int(r.data.params["k"])
        assert r.info.status == "FINISHED" and r.data.tags["dpcam.worker"] == str(k)
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(20))  # none half-written
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"note-{k}.txt"]


@pytest.mark.slow
def test_concurrent_workers_share_the_default_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_ids = _workers_log(tmp_path, None, 6)
    tracking._setup()
    _assert_complete(run_ids, 6)


@pytest.mark.postgres
def test_concurrent_workers_share_a_tracking_server_on_postgresql(postgres_url, tmp_path, monkeypatch):
    """docs/scale-out.md's cluster setup: `mlflow server` with a PostgreSQL backend, workers log over HTTP."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import psycopg

    monkeypatch.chdir(tmp_path)
    with psycopg.connect(postgres_url, autocommit=True) as db:  # its own database: the search tests use theirs
        db.execute("DROP DATABASE IF EXISTS mlflow_test")
        db.execute("CREATE DATABASE mlflow_test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + "/mlflow_test"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
         "--port", str(port), "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # creating MLflow's schema takes a while on a busy 2-core machine
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        run_ids = _workers_log(tmp_path, uri, 4)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking._setup()
        _assert_complete(run_ids, 4)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
