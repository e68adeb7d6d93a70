import os
from pathlib import Path

import pytest
import torch

from dpcam import train
from dpcam.config import GridConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.executor import run_jobs
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
    )


def _base() -> TrainConfig:
    return TrainConfig(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.5, device="cpu", delta=1e-3)


@pytest.mark.slow
def test_local_processes_give_the_serial_results(tmp_path):
    results = {}
    for executor in ("serial", "local"):
        folder = tmp_path / executor
        folder.mkdir()
        os.chdir(folder)
        make_tiny()
        torch.set_num_threads(1)  # the local workers train with one thread each (2 cores / 2 workers)
        records = train.run_family("gaussian", _grid(executor), _base(), progress=False)
        results[executor] = {
            r.run_name: (
                r.epsilon,
                r.val_curve,
                r.test_accuracy,
                r.steps,
                Path(f"models/gaussian/{r.run_name}/model.pt").stat().st_size,
            )
            for r in records
        }
    assert results["serial"] == results["local"] and len(results["serial"]) == 2


def _fails(x):
    if x == 2:
        raise UserError("bad input two")
    return x * 10


def test_a_failed_job_names_its_run_after_the_others_finish():
    assert run_jobs(_fails, [(1,), (3,)], ["a", "b"], executor="local") == [10, 30]
    with pytest.raises(UserError, match=r"^run b: bad input two; rerun the stage"):
        run_jobs(_fails, [(1,), (2,), (3,)], ["a", "b", "c"], executor="local")
    with pytest.raises(UserError, match="unknown executor 'ray2'"):
        run_jobs(_fails, [(1,)], ["a"], executor="ray2")
