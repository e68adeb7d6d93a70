"""SIGTERM inside a run (dpcam.tracking.signals): held back while MLflow works, and the run ends KILLED."""

import os

import pytest

from dpcam import tracking


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
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier test of this worker left (ray.init's)
    with pytest.raises(tracking.Terminated, match="SIGTERM"):
        with tracking.run("exp", "t") as run_id:
            seen["id"] = run_id
            tracking.log_metrics({"a": 1.0})
            seen["after"] = True  # not reached: the signal is raised when log_metrics returns
    r = tracking.get_run(seen["id"])
    assert r.info.status == "KILLED" and r.data.metrics == {"a": 1.0} and "after" not in seen
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it, the earlier one back
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
