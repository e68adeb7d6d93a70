import json
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpcam import layout, tracking, train
from dpcam.cli import app
from dpcam.config import TrainConfig
from dpcam.errors import UserError
from tests.conftest import make_tiny


def cfg(**kw) -> TrainConfig:
    base = dict(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.1, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def tiny():
    return make_tiny()


def test_non_private_fit_learns_and_returns_metrics(tiny):
    res = train.fit(cfg(scheme="none", epochs=4), progress=False)
    m = res.metrics
    assert m["test_accuracy"] > 0.8 and not m["collapsed"]
    assert m["epsilon"] in (None, float("inf")) and m["scheme"] == "none"
    assert sum(m["test_pred_histogram"]) == 48 and len(res.history) == 4
    assert {"test_qwk", "test_macro_f1", "val_accuracy", "best_epoch"} <= set(m)


def test_gaussian_epsilon_is_what_the_accountant_says(tiny):
    from dpcam.explain.gradcam import opacus_state
    from dpcam.privacy.accounting import gaussian_epsilon

    res = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3), progress=False)
    assert opacus_state(res.model, active_only=False) is None  # a plain model: no hooks, no per-sample attributes
    m = res.metrics
    assert m["steps"] == 2 * round(1 / m["sample_rate"])
    independent = gaussian_epsilon(m["noise_multiplier"], m["sample_rate"], m["steps"], 1e-3, accountant="prv")
    assert m["epsilon"] == pytest.approx(independent, rel=1e-6)
    assert m["epsilon"] <= 2.0 + 1e-6 and m["accountant"] == "prv"
    assert m["epsilon_rdp_check"] >= m["epsilon"] * 0.9


def test_laplace_epsilon_within_target(tiny):
    from dpcam.privacy.accounting import laplace_epsilon

    m = train.fit(cfg(scheme="laplace", epsilon=4.0, delta=1e-3, clip=5.0), progress=False).metrics
    assert m["epsilon"] <= 4.0 * (1 + 1e-6)
    assert m["epsilon"] == pytest.approx(
        laplace_epsilon(m["noise_multiplier"], m["sample_rate"], m["steps"], 1e-3), rel=1e-3
    )


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, tmp_path):
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=3)
    whole = train.fit(c, checkpoint=tmp_path / "a.pt", progress=False)

    class Killed(BaseException):
        pass

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train.fit(c, checkpoint=tmp_path / "b.pt", on_epoch=kill_after_first, progress=False)
    resumed = train.fit(c, checkpoint=tmp_path / "b.pt", resume=True, progress=False)
    assert resumed.metrics["epsilon"] == whole.metrics["epsilon"]
    assert resumed.metrics["steps"] == whole.metrics["steps"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["val_accuracy"] for r in resumed.history] == [r["val_accuracy"] for r in whole.history]


def test_checkpoint_from_another_config_or_without_ledger_is_refused(tiny, tmp_path):
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1)
    train.fit(c, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(UserError, match=r"another config \(clip: 1\.0 -> 2\.0\)"):
        train.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, clip=2.0),
            checkpoint=tmp_path / "c.pt",
            resume=True,
        )
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["ledger"] = None
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match="no privacy ledger; refusing to resume"):
        train.fit(c, checkpoint=tmp_path / "c.pt", resume=True)


def test_run_tracks_in_mlflow_and_writes_outputs(tiny):
    import mlflow

    m = train.run(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False)
    name = "gaussian-eps2-smallcnn-s0"
    saved = json.loads(Path(f"models/{name}/train.json").read_text())
    for key in (
        "dataset",
        "model",
        "scheme",
        "target_epsilon",
        "epsilon",
        "delta",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "accountant",
        "test_accuracy",
        "test_qwk",
        "mlflow_run_id",
    ):
        assert key in saved, key
    assert not Path(f"models/{name}/checkpoint.pt").exists()
    model, spec = train.load_model(name)
    assert spec["num_classes"] == 2
    mlflow.set_tracking_uri(tracking.tracking_uri())
    r = mlflow.get_run(m["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == name
    assert r.data.metrics["epsilon"] == pytest.approx(m["epsilon"])
    assert r.data.params["scheme"] == "gaussian" and r.data.tags["dpcam.version"]

    assert saved["mlflow_model_uri"].startswith("models:/")
    logged = tracking.load_model(saved["mlflow_model_uri"])
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(logged(x), model(x), atol=1e-5)
    assert type(logged) is type(model) and logged.gradcam_layer == model.gradcam_layer  # dpcam's module, not a trace


def _status(run_id):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.get_run(run_id).info.status


def test_failed_and_killed_runs_never_end_finished(tiny, monkeypatch):
    import mlflow

    seen = {}
    real_fit = train.fit

    def failing_fit(c, **kw):
        seen["id"] = mlflow.active_run().info.run_id
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "fit", failing_fit)
    with pytest.raises(RuntimeError):
        train.run(cfg(scheme="none", epochs=1), progress=False)
    assert _status(seen["id"]) == "FAILED"

    def terminated_fit(c, **kw):
        seen["id"] = mlflow.active_run().info.run_id
        os.kill(os.getpid(), signal.SIGTERM)
        return real_fit(c, **kw)

    monkeypatch.setattr(train, "fit", terminated_fit)
    with pytest.raises(Exception, match="signal"):
        train.run(cfg(scheme="none", epochs=1, name="term"), progress=False)
    assert _status(seen["id"]) == "KILLED"


def test_resume_via_cli_continues_the_same_mlflow_run(tiny):
    runner = CliRunner()
    args = [
        "train",
        "--dataset",
        "tiny",
        "--scheme",
        "gaussian",
        "--epsilon",
        "2",
        "--delta",
        "1e-3",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.1",
        "--device",
        "cpu",
        "--name",
        "r",
    ]
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=2, name="r")

    class Killed(BaseException):
        pass

    def kill(epoch, row):
        raise Killed

    from dpcam import tracking

    with pytest.raises(Killed):
        with tracking.run("tiny", "r") as run_id:
            train.fit(
                c,
                checkpoint=Path("models/r/checkpoint.pt"),
                on_epoch=kill,
                extra_state={"mlflow_run_id": run_id},
                progress=False,
            )
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "pass --resume" in again.output
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("models/r/train.json").read_text())["mlflow_run_id"] == run_id
    assert _status(run_id) == "FINISHED"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epsilon", "0"], "train.epsilon"),
        (["--epsilon", "-1"], "train.epsilon"),
        (["--delta", "1"], "train.delta = 1.0"),
        (["--delta", "0"], "train.delta = 0.0"),
        (["--clip", "0"], "train.clip = 0.0"),
        (["--model", "resnet99"], "unknown model 'resnet99'"),
        (["--scheme", "magic"], "train.scheme = 'magic'"),
        (["--accountant", "moments"], "train.accountant = 'moments'"),
        (["--ldp", "pixel-laplace-eps9"], "unknown LDP dataset 'pixel-laplace-eps9'"),
        (["--dataset", "nothere"], "unknown dataset 'nothere'"),
        (["--epsilon", "1e-9", "--epochs", "1", "--delta", "1e-4"], "target ε=1e-09 at δ=0.0001 cannot be reached"),
    ],
)
def test_bad_training_input_is_one_line_exit_2(tiny, flags, message):
    res = CliRunner().invoke(app, ["train", "--dataset", "tiny", "--device", "cpu", "--epochs", "1", *flags])
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not Path("models").exists() and not Path("metrics").exists()


def test_ghost_clipping_trains_with_the_same_accounting(tiny):
    m = train.fit(
        cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, grad_sample_mode="ghost"), progress=False
    ).metrics
    hooks = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    assert m["epsilon"] == hooks["epsilon"] and m["noise_multiplier"] == hooks["noise_multiplier"]
    assert m["steps"] == hooks["steps"]


def test_sigkill_then_resume_gives_the_uninterrupted_epsilon(tiny):
    """A real `kill -9` after an epoch's checkpoint; `--resume` ends with the ε of a run never killed."""
    import subprocess
    import sys
    import time

    args = [
        "--dataset",
        "tiny",
        "--scheme",
        "gaussian",
        "--epsilon",
        "2",
        "--delta",
        "1e-3",
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--device",
        "cpu",
    ]
    ckpt = Path("models/k/checkpoint.pt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpcam", "train", *args, "--name", "k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert ckpt.exists(), "the run was killed after writing an epoch checkpoint"
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at < 4
    res = CliRunner().invoke(app, ["train", *args, "--name", "k", "--resume"])
    assert res.exit_code == 0, res.output
    whole = CliRunner().invoke(app, ["train", *args, "--name", "w"])
    assert whole.exit_code == 0, whole.output
    k = json.loads(Path("models/k/train.json").read_text())
    w = json.loads(Path("models/w/train.json").read_text())
    assert k["epsilon"] == w["epsilon"] and k["steps"] == w["steps"]
    assert k["test_accuracy"] == w["test_accuracy"]


def _grid(**kw):
    from dpcam.config import GridConfig

    base = dict(
        name="t",
        models=["smallcnn"],
        seeds=[0],
        gaussian=[2],
        laplace=[5],
        laplace_clip=7,
        laplace_lr=0.05,
        baselines=["none"],
        ldp=[],
        clip_sweep={"epsilon": 2, "clips": [3]},
        train_sizes={"sizes": [40], "gaussian": [2], "none": False},
        nonprivate={"optimizer": "adam", "lr": 0.01, "batch_size": 16},
    )
    return GridConfig.model_validate({**base, **kw})


def test_run_family_trains_every_run_of_the_family_into_its_folder(tiny):
    grid = _grid(gaussian=[2, 4])
    results = train.run_family("gaussian", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert [r["run_name"] for r in results] == ["gaussian-eps2-smallcnn-s0", "gaussian-eps4-smallcnn-s0"]
    for r in results:
        saved = json.loads(Path(f"models/gaussian/{r['run_name']}/train.json").read_text())
        assert saved["epsilon"] == pytest.approx(r["epsilon"]) and saved["epsilon"] <= saved["target_epsilon"] + 1e-6
        assert layout.run_dir(r["run_name"]) == Path(f"models/gaussian/{r['run_name']}")
    small = train.run_family("train-size", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert small[0]["train_size"] == 40
    assert train.run_family("ldp", grid, cfg(), progress=False) == [] and Path("models/ldp").is_dir()
    with pytest.raises(UserError, match="unknown grid family 'gausian'"):
        train.run_family("gausian", grid, cfg())


@pytest.mark.gpu
def test_a_gaussian_run_on_cuda_is_accounted_as_on_the_cpu(tiny):
    """The Poisson sampler and the ledger live on the CPU: ε and steps do not depend on the device."""
    cpu = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    gpu = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, device="cuda"), progress=False).metrics
    assert gpu.device == "cuda" and gpu.steps == cpu.steps and gpu.epsilon == cpu.epsilon
