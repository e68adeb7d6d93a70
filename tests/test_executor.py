import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from dpcam.config import GridConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.executor import run_jobs
from dpcam.train import family as train_family
from tests.conftest import make_tiny


def _grid(executor: str) -> GridConfig:
    return GridConfig(
        models=["smallcnn"],
        seeds=[0, 1],
        gaussian=[2],
        baselines=["none"],
        family_seeds={},
        executor=executor,
        workers=2,
        nonprivate={"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 2},
        schedules=None,
    )


def _base() -> TrainConfig:
    return TrainConfig(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.5, device="cpu", delta=1e-3)


def _fails(x):
    if x == 2:
        raise UserError("bad input two")
    return x * 10


@pytest.mark.slow
def test_a_failed_job_names_its_run_after_the_others_finish():
    assert run_jobs(_fails, [(1,), (3,)], ["a", "b"], executor="local") == [10, 30]
    with pytest.raises(UserError, match=r"^run b: bad input two; rerun the stage"):
        run_jobs(_fails, [(1,), (2,), (3,)], ["a", "b", "c"], executor="local")
    with pytest.raises(UserError, match="unknown executor 'ray2'"):
        run_jobs(_fails, [(1,)], ["a"], executor="ray2")


@pytest.mark.parametrize("executor", ["serial", "local"])
@pytest.mark.slow
def test_each_finished_run_prints_one_line_with_its_result_count_and_time_left(executor, capsys):
    """A `dvc repro` without a terminal shows its progress: one line per run as it finishes (stderr)."""
    out = run_jobs(_fails, [(1,), (3,), (4,)], ["a", "b", "c"], executor=executor, stage="train-x", describe=str)
    assert out == [10, 30, 40]  # results in job order, whatever order the runs finished in
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train-x"] * 3
    assert sorted(line.split(" ")[5] for line in lines) == ["a:", "b:", "c:"]
    assert [line.split(" ")[2] for line in lines] == ["1", "2", "3"] and all(" of 3 " in line for line in lines)
    assert "left)" in lines[0] and "left)" in lines[1] and lines[2].endswith(", done)")
    assert {line.split(": ")[2].split(" (")[0] for line in lines} == {"10", "30", "40"}


# ------------------------------------------------------------------------------------ Ray (local mode)


@pytest.fixture
def local_ray(monkeypatch):
    ray = pytest.importorskip("ray")  # in the dev extra: CI has it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    repo = str(Path(__file__).resolve().parents[1])  # Ray's workers import this module's functions (tests.*)
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_every_executor_gives_the_serial_results(tmp_path, local_ray):
    results = {}
    for executor in ("serial", "local", "ray"):
        folder = tmp_path / executor
        folder.mkdir()
        os.chdir(folder)
        make_tiny()
        torch.set_num_threads(2)  # the caller's threads do not matter: every executor trains with cpus_per_run
        records = train_family.run_family("gaussian", _grid(executor), _base(), progress=False)
        results[executor] = {
            r.run_name: (
                r.epsilon,
                r.val_curve,
                r.test_accuracy,
                r.steps,
                r.noise_multiplier,
                Path(f"models/gaussian/{r.run_name}/model.pt").stat().st_size,
            )
            for r in records
        }
    assert results["serial"] == results["local"] == results["ray"] and len(results["serial"]) == 2


def _dies(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-run (OOM killer, preemption)
    return _fails(x)


@pytest.mark.slow
def test_ray_names_the_failed_and_the_killed_run(local_ray):
    assert run_jobs(_fails, [(1,), (3,)], ["a", "b"], executor="ray") == [10, 30]
    with pytest.raises(UserError, match=r"^run b: bad input two \(1 more failed\); rerun the stage"):
        run_jobs(_dies, [(1,), (2,), (3,)], ["a", "b", "c"], executor="ray")
    with pytest.raises(UserError, match=r"^run c: its Ray worker died"):
        run_jobs(_dies, [(1,), (3,)], ["a", "c"], executor="ray")


@pytest.mark.slow
def test_ray_bad_input_is_one_line(monkeypatch, local_ray):
    with pytest.raises(
        UserError, match=r"grid.gpus_per_run = 0.25 but this machine has no GPU; set grid.gpus_per_run: 0"
    ):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        run_jobs(_fails, [(1,)], ["a"], executor="ray", gpus_per_run=0.25)
    local_ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(UserError, match=r"^RAY_ADDRESS=127.0.0.1:9: no Ray cluster answers there .*`ray start --head`"):
        run_jobs(_fails, [(1,)], ["a"], executor="ray")
    monkeypatch.setenv("RAY_ADDRESS", "headnode")
    with pytest.raises(UserError, match=r"^RAY_ADDRESS=headnode: not host:port"):
        run_jobs(_fails, [(1,)], ["a"], executor="ray")


def test_ray_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(
        UserError, match=r"^grid.executor = ray needs Ray, which is not installed: pip install 'dpcam\[ray\]'$"
    ):
        run_jobs(_fails, [(1,)], ["a"], executor="ray")


def test_gpus_per_run_is_refused_outside_ray():
    with pytest.raises(ValueError, match="gpus_per_run = 0.5 applies to executor: ray only"):
        GridConfig(executor="local", gpus_per_run=0.5)
    assert GridConfig(executor="ray", gpus_per_run=0.25).run_options() == {
        "executor": "ray",
        "workers": 2,
        "cpus_per_run": 1.0,
        "gpus_per_run": 0.25,
    }
