"""dpcam.train.lock: one process per run folder."""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpcam.cli import app
from dpcam.errors import UserError
from dpcam.train import family as train_family
from dpcam.train import lock as train_lock
from tests.conftest import tiny_grid
from tests.train.conftest import TRAIN_ARGS, cfg


@pytest.mark.slow
def test_a_second_process_on_a_live_run_is_refused_naming_it(tiny):
    """A live run with a checkpoint looked "interrupted": --resume joined two processes in one MLflow run."""
    import subprocess
    import sys
    import time

    args = [*TRAIN_ARGS, "--epochs", "500", "--name", "live"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpcam", "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = Path("models/live/checkpoint.pt")
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt.exists() and proc.poll() is None
        for extra in ([], ["--resume"]):
            res = CliRunner().invoke(app, ["train", *args, *extra])
            assert res.exit_code == 2, res.output
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: run 'live' is being trained right now"), lines
            assert f"by process {proc.pid} on " in lines[0] and "models/live/.train.lock" in lines[0]
        assert proc.poll() is None  # the live one goes on
    finally:
        proc.kill()
        proc.wait()
    # the lock went with the process: now it is an interrupted run
    res = CliRunner().invoke(app, ["train", *args])
    assert res.exit_code == 2 and "pass --resume" in res.output


def test_run_family_leaves_a_live_runs_folder_alone(tiny):
    folder = Path("models/gaussian/gaussian-eps2-smallcnn-s0")
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"the live run's")
    with train_lock.run_lock(folder, "gaussian-eps2-smallcnn-s0"):
        with pytest.raises(UserError, match=f"is being trained right now by process {os.getpid()}"):
            train_family.run_family("gaussian", tiny_grid(), cfg(scheme="gaussian", epochs=1), progress=False)
        assert (folder / "checkpoint.pt").read_bytes() == b"the live run's"
    assert not (folder / train_lock.LOCK_FILE).exists()
