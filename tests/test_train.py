import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpcam import layout, tracking, train
from dpcam.cli import app
from dpcam.config import TrainConfig
from dpcam.errors import UserError
from dpcam.saved import load_model
from tests.conftest import make_tiny, tiny_grid


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


@pytest.mark.parametrize("recipe", [{}, {"ema": 0.9, "augment": "flip-shift", "aug_mult": 2}])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, tmp_path, recipe):
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=3, **recipe)
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
    preds = np.load(f"models/{name}/predictions.npz")  # every test image: prediction, label, probabilities
    assert np.array_equal(preds["prob"].argmax(1), preds["pred"]) and np.allclose(preds["prob"].sum(1), 1, atol=1e-5)
    hits = preds["pred"] == preds["label"]
    assert saved["test_recall"] == [pytest.approx(hits[preds["label"] == c].mean()) for c in (0, 1)]
    assert 0 <= saved["test_ece"] <= 1 and saved["test_confidence"] == pytest.approx(preds["prob"].max(1).mean())
    model, spec = load_model(name)
    assert spec["num_classes"] == 2
    mlflow.set_tracking_uri(tracking.tracking_uri())
    r = mlflow.get_run(m["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == name
    assert r.data.metrics["epsilon"] == pytest.approx(m["epsilon"])
    assert r.data.metrics["test_recall_1"] == pytest.approx(saved["test_recall"][1])
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
    with pytest.raises(tracking.Terminated, match="signal 15"):
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


def test_bf16_trains_with_the_same_accounting_and_says_so(tiny):
    """precision bf16: the same plan and ε (accounting does not depend on dtype), recorded in train.json."""
    bf = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, precision="bf16"), progress=False)
    fp = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    m = bf.metrics
    assert m["precision"] == "bf16" and fp["precision"] == "fp32"
    assert m["epsilon"] == fp["epsilon"] and m["noise_multiplier"] == fp["noise_multiplier"]
    assert all(p.dtype == torch.float32 for p in bf.model.parameters())  # the saved model stays float32


def test_ema_and_augmentation_multiplicity_keep_the_accounting_and_are_recorded(tiny):
    """Averaging views before clipping and averaging the weights are not privacy events: the same plan and ε."""
    plain = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=2), progress=False)
    res = train.fit(
        cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=2, ema=0.9, augment="flip-shift", aug_mult=3),
        progress=False,
    )
    m = res.metrics
    assert (m["ema"], m["augment"], m["aug_mult"]) == (0.9, "flip-shift", 3)
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert m[key] == plain.metrics[key], key
    assert not any(torch.equal(a, b) for a, b in zip(res.model.parameters(), plain.model.parameters()))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ema": 1.0}, "ema"),
        ({"ema": 0.0}, "ema"),
        ({"aug_mult": 0}, "aug_mult"),
        ({"aug_mult": 2}, "aug_mult = 2 averages augmented views: set augment"),
        ({"aug_mult": 2, "augment": "flip-shift", "grad_sample_mode": "ghost"}, "use grad_sample_mode hooks"),
    ],
)
def test_bad_recipe_keys_are_refused_naming_the_key(tiny, bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        cfg(scheme="gaussian", epsilon=2.0, **bad)


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


def test_run_family_trains_every_run_of_the_family_into_its_folder(tiny):
    grid = tiny_grid(gaussian=[2, 4])
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


def test_a_grid_eps_no_noise_reaches_is_refused_before_any_run_trains(tiny):
    grid = tiny_grid(gaussian=[2, 1e-9])
    with pytest.raises(UserError, match=r"gaussian-eps1e-09-smallcnn-s0: target ε = 1e-09 .* cannot be reached"):
        train.run_family("gaussian", grid, cfg(scheme="gaussian", epochs=1), progress=False)
    assert not Path("models/gaussian/gaussian-eps2-smallcnn-s0/train.json").exists()  # ε = 2 was not trained first


@pytest.mark.gpu
def test_a_gaussian_run_on_cuda_is_accounted_as_on_the_cpu(tiny):
    """The Poisson sampler and the ledger live on the CPU: ε and steps do not depend on the device."""
    cpu = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    gpu = train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, device="cuda"), progress=False).metrics
    assert gpu.device == "cuda" and gpu.steps == cpu.steps and gpu.epsilon == cpu.epsilon


# ------------------------------------------------------------------------------------ what MLflow shows


def _mlflow_grid(root: Path) -> dict[str, str]:
    """Train a small grid into ``root`` (its own folder and store); {run name: MLflow run id}."""
    from dpcam.config import LdpConfig
    from dpcam.data.ldp import derive

    derive(make_tiny(), "singh-sikka", 1, LdpConfig())
    real_validate = train._validate

    def last_epoch_worse(t, epoch, loss):  # the selected (best) epoch is not the last one
        row = real_validate(t, epoch, loss)
        if epoch == t.cfg.epochs - 1 and t.cfg.name == "declining":
            row["val_accuracy"] = 0.0
        return row

    runs = [
        cfg(scheme="none", epochs=2),
        cfg(scheme="clip-only", epochs=1),
        cfg(scheme="gaussian", epsilon=1, delta=1e-3, epochs=2, name="declining"),
        cfg(scheme="gaussian", epsilon=2, delta=1e-3, epochs=1),
        cfg(scheme="laplace", epsilon=1, delta=1e-3, clip=5.0, epochs=1),
        cfg(scheme="ldp", ldp="singh-sikka-eps1", epochs=1),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "_validate", last_epoch_worse)
        return {c.run_name: train.run(c, progress=False, grid="g").mlflow_run_id for c in runs}


@pytest.fixture(scope="module")
def mlflow_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    here = Path.cwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        os.chdir(root)
        try:
            ids = _mlflow_grid(root)
        finally:
            os.chdir(here)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return root, ids, client


def _search(client, filter_string: str = "", order_by: list[str] | None = None):
    exp = client.get_experiment_by_name("tiny")
    return client.search_runs([exp.experiment_id], filter_string=filter_string, order_by=order_by)


def test_mlflow_shows_train_json_values(mlflow_grid):
    """Every metric MLflow shows (its latest value: UI, compare view, search_runs) under a train.json key
    has train.json's value; the per-epoch curve has its own key."""
    root, ids, client = mlflow_grid
    runs = _search(client)
    assert sorted(r.info.run_name for r in runs) == sorted(ids)
    declining = next(r for r in runs if r.info.run_name == "declining")
    saved = json.loads((root / "models/declining/train.json").read_text())
    assert declining.data.metrics["val_accuracy"] == saved["val_accuracy"] > 0.0  # not the last epoch's 0.0
    for r in runs:
        saved = json.loads((root / "models" / r.info.run_name / "train.json").read_text())
        shared = set(r.data.metrics) & set(saved)
        assert {"val_accuracy", "test_accuracy", "test_qwk", "steps", "best_epoch"} <= shared, r.info.run_name
        for key in shared:
            assert r.data.metrics[key] == saved[key], (r.info.run_name, key, r.data.metrics[key], saved[key])
        curve = client.get_metric_history(r.info.run_id, "val_accuracy_epoch")
        assert [m.step for m in curve] == list(range(1, saved["epochs"] + 1))
    assert declining.data.metrics["val_accuracy_epoch"] == 0.0  # the curve's latest: the last epoch


def test_mlflow_params_say_what_each_run_did(mlflow_grid):
    """ε = 1 filters to the DP runs at ε = 1; ∞ is 'inf'; clip only on clipped runs; the data's ε for LDP."""
    _, ids, client = mlflow_grid
    names = lambda runs: sorted(r.info.run_name for r in runs)
    assert names(_search(client, "params.epsilon = '1'")) == ["declining", "laplace-eps1-smallcnn-s0"]
    assert names(_search(client, "params.epsilon = 'inf'")) == [
        "clip-only-epsinf-smallcnn-s0",
        "none-epsinf-smallcnn-s0",
    ]
    assert names(_search(client, "params.clip = '1.0'")) == [
        "clip-only-epsinf-smallcnn-s0",
        "declining",
        "gaussian-eps2-smallcnn-s0",
    ]
    by_name = {r.info.run_name: r for r in _search(client)}
    ldp = by_name["ldp-singh-sikka-eps1-smallcnn-s0"]
    assert "epsilon" not in ldp.data.params and "clip" not in ldp.data.params and "delta" not in ldp.data.params
    assert ldp.data.params["ldp_epsilon"] == "1" and ldp.data.params["ldp_scope"] == "none"
    assert ldp.data.metrics["ldp_epsilon"] == 1.0
    none = by_name["none-epsinf-smallcnn-s0"]
    assert not {"clip", "delta", "accountant", "grad_sample_mode"} & set(none.data.params)
    assert "accountant" not in by_name["laplace-eps1-smallcnn-s0"].data.params
    # a numeric ε that sorts: the DP runs first, by target; ∞ is not a metric (MLflow stores it as 1.8e308)
    ordered = _search(client, "metrics.target_epsilon > 0", order_by=["metrics.target_epsilon ASC"])
    assert [r.data.metrics["target_epsilon"] for r in ordered] == [1.0, 1.0, 2.0]
    for r in by_name.values():
        noised = r.data.params["scheme"] in ("gaussian", "laplace")
        assert ("epsilon" in r.data.metrics) == noised and ("delta" in r.data.metrics) == noised, r.info.run_name
    gaussian = [set(r.data.metrics) for r in by_name.values() if r.data.params["scheme"] == "gaussian"]
    assert gaussian[0] == gaussian[1]  # the same keys on every run where the values exist


# ------------------------------------------------------------------------------------ one process per run folder


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
    with train.run_lock(folder, "gaussian-eps2-smallcnn-s0"):
        with pytest.raises(UserError, match=f"is being trained right now by process {os.getpid()}"):
            train.run_family("gaussian", tiny_grid(), cfg(scheme="gaussian", epochs=1), progress=False)
        assert (folder / "checkpoint.pt").read_bytes() == b"the live run's"
    assert not (folder / train.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_mid_epoch_is_one_line_exit_143_killed_and_resumable(tiny, monkeypatch):
    real = train._train_epoch

    def second_epoch_terminated(t, epoch, progress):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # raised here, at the start of the second epoch
        return real(t, epoch, progress)

    monkeypatch.setattr(train, "_train_epoch", second_epoch_terminated)
    args = ["train", *TRAIN_ARGS, "--epochs", "2", "--name", "t"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 143, res.output
    assert res.stderr.strip().splitlines() == [
        "error: terminated by signal 15 (SIGTERM); the unfinished stage's outputs were not written; "
        "--resume continues it from its last finished epoch"
    ]
    ckpt = torch.load("models/t/checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and _status(ckpt["mlflow_run_id"]) == "KILLED"
    assert not Path("models/t/train.json").exists()
    monkeypatch.setattr(train, "_train_epoch", real)
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert _status(ckpt["mlflow_run_id"]) == "FINISHED"


def test_sigterm_while_mlflow_logs_the_model_ends_killed(tiny, monkeypatch):
    """MLflow runs the model inside `except Exception` (signature inference): the signal must not die there."""
    import mlflow.pytorch

    real = mlflow.pytorch._PyTorchWrapper.predict

    def predict_terminated(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.pytorch._PyTorchWrapper, "predict", predict_terminated)
    res = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--epochs", "1", "--name", "t"])
    assert res.exit_code == 143, res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: terminated by signal 15 (SIGTERM)")
    run_id = torch.load("models/t/checkpoint.pt", weights_only=True)["mlflow_run_id"]
    assert _status(run_id) == "KILLED"


# ------------------------------------------------------------------------------------ faults: one line each


@pytest.mark.parametrize("folder", ["models", "models/ro"])
def test_a_read_only_output_folder_is_refused_before_training(tiny, monkeypatch, folder):
    from tests.readonly import read_only

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "fit", no_training)
    Path(folder).mkdir(parents=True)
    with read_only(Path(folder)):
        res = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--epochs", "1", "--name", "ro"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder} is not writable"), lines


@pytest.mark.parametrize(
    "paths, message",
    [
        (["mlruns/mlflow.db"], "error: MLflow tracking store sqlite:///"),
        (["mlruns/mlflow.db", "mlruns"], "error: MLflow artifact folder "),
    ],
)
def test_a_read_only_mlflow_store_is_refused_before_training(tiny, monkeypatch, paths, message):
    from tests.readonly import read_only

    with tracking.run("tiny", "earlier"):
        pass

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "fit", no_training)
    with read_only(*map(Path, paths)):
        res = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--epochs", "1", "--name", "ro"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not Path("models").exists()  # nothing half written


def test_a_batch_size_above_n_is_said(tiny):
    with pytest.warns(UserWarning, match=r"batch size 1000 is more than the 144 training images; using 144"):
        m = train.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, batch_size=1000), progress=False
        ).metrics
    assert m.sample_rate == 1.0


def test_cli_warnings_are_one_line_each(tiny):
    """δ ≥ 1/N was printed twice (a log record and a warning with its source line); the clamp not at all."""
    import subprocess
    import sys

    args = ["--dataset", "tiny", "--scheme", "gaussian", "--epsilon", "2", "--delta", "0.01", "--epochs", "1"]
    refused = subprocess.run(
        [sys.executable, "-m", "dpcam", "train", *args, "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0 and not Path("models/gaussian-eps2-smallcnn-s0").exists()
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: δ=0.01 ≥ 1/N") and "(δ·N = 1.44), or set train.force_delta (--force-delta)" in line
    args.append("--force-delta")
    out = subprocess.run(
        [sys.executable, "-m", "dpcam", "train", *args, "--batch-size", "1000", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    delta = [line for line in lines if "1/N" in line]
    clamp = [line for line in lines if "batch size 1000" in line]
    assert len(delta) == 1 and delta[0].startswith("warning: δ=0.01 ≥ 1/N"), lines
    assert len(clamp) == 1 and clamp[0].startswith("warning: gaussian-eps2-smallcnn-s0: batch size 1000"), lines
    assert not [line for line in lines if "warnings.warn" in line or "make_private(" in line]


# ------------------------------------------------------------------------------------ public pretraining, fine-tuning


def make_public_tiny(name="tiny-public", n=240, size=16, public=True, seed=1):
    """A public companion of make_tiny: the same task drawn with another generator (no image in common)."""
    import numpy as np

    from dpcam.data import store

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    c = size // 4
    images[labels == 1, c : 3 * c, c : 3 * c] += 120
    splits = store.stratified_split(labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    with store.DatasetWriter(Path("data/prepared") / name, n, size, size, with_masks=False) as w:
        w.images[:] = images
        w.finish(labels, splits, {"dataset": name, "classes": ["plain", "square"], "public": public})
    return Path("data/prepared") / name


@pytest.fixture
def trunk(tiny):
    """A trunk trained without privacy on the public set, saved as the public family saves it."""
    make_public_tiny()
    c = cfg(scheme="none", public=True, epochs=3, name="trunk")
    train.run(c, progress=False)
    return Path("models/trunk/model.pt")


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("scheme", ["gaussian", "laplace"])
def test_head_fine_tuning_trains_only_the_head_and_its_epsilon_is_the_accountants(trunk, scheme, capsys):
    from dpcam.data.store import file_sha256
    from dpcam.explain.gradcam import opacus_state
    from dpcam.models import create_model, target_layer
    from dpcam.privacy.accounting import gaussian_epsilon, laplace_epsilon

    c = cfg(scheme=scheme, epsilon=2.0, delta=1e-3, clip=1.0, lr=0.5, trainable="head", weights=trunk, epochs=2)
    m = train.run(c, progress=False)
    assert m.run_name == f"{scheme}-eps2-ft-head-smallcnn-s0"
    saved, start = _state(f"models/{m.run_name}/model.pt"), _state(trunk)
    # the saved model is the whole model: every tensor, the trunk exactly the public one, the head trained
    whole = create_model("smallcnn", 2, 16)
    assert set(saved) == set(whole.state_dict())
    for k, v in saved.items():
        if k.startswith("classifier."):
            assert not torch.equal(v, start[k]), k
        else:
            assert torch.equal(v, start[k]), k
    # ε: the accountant's for the steps and q that ran (only the fine-tuning: the trunk was public)
    if scheme == "gaussian":
        independent = gaussian_epsilon(m.noise_multiplier, m.sample_rate, m.steps, 1e-3, "prv")
    else:
        independent = laplace_epsilon(m.noise_multiplier, m.sample_rate, m.steps, 1e-3)
    assert m.epsilon == pytest.approx(independent, rel=1e-6) and m.epsilon <= 2.0 + 1e-6
    assert m.steps == 2 * round(1 / m.sample_rate) and m.guarantee == "dp"
    assert m.trainable == "head" and m.trained_parameters == ["classifier.weight", "classifier.bias"]
    assert m.trained_parameter_count == 32 * 2 + 2
    assert m.weights == str(trunk) and m.weights_sha256 == file_sha256(trunk)
    # the file's account, printed and recorded: every trunk tensor used, the file's input normalisation ignored, the
    # head trained from initialisation
    n = len(start)
    assert m.weights_loaded.startswith(f"weights {trunk}: {n} tensors in the file, {n - 4} used; 2 ignored (the file")
    assert "2 not used: trained from initialisation (classifier.weight, classifier.bias)" in m.weights_loaded
    assert f"{m.run_name}: {m.weights_loaded}" in capsys.readouterr().err
    pub = m.public_data
    assert pub["public"] is True and pub["path"] == "data/prepared/tiny-public" and pub["run"] == "trunk"
    assert pub["manifest_sha256"] == file_sha256(Path("data/prepared/tiny-public/manifest.json"))
    assert pub["disjoint_check"]["shared_images"] == 0
    # Grad-CAM reads the reloaded whole model at the usual layer
    model, spec = load_model(m.run_name)
    assert opacus_state(model, active_only=False) is None and spec["config"]["trainable"] == "head"
    assert target_layer(model) is model.features.block3 and model.gradcam_layer == whole.gradcam_layer


def test_the_public_trunk_run_records_its_public_data(trunk):
    m = json.loads(Path("models/trunk/train.json").read_text())
    assert m["data_dir"] == "data/prepared/tiny-public" and m["trainable"] == "all"
    assert m["public_data"]["public"] is True and m["public_data"]["disjoint_check"]["private"] == "data/prepared/tiny"
    assert "guarantee" not in m  # non-private: ε = ∞, no guarantee field


def test_weights_that_do_not_fit_the_trunk_stop_fine_tuning_naming_the_tensors(trunk):
    state = _state(trunk)
    del state["features.block1.0.weight"]
    state["features.block2.0.weight"] = torch.zeros(32, 16, 5, 5)
    torch.save(state, "bad.pt")
    with pytest.raises(UserError) as e:
        train.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, trainable="head", weights="bad.pt"), progress=False)
    msg = str(e.value)
    assert "2 tensors of the frozen trunk of SmallCNN do not fit" in msg and "\n" not in msg
    assert "missing 1: features.block1.0.weight" in msg
    assert "another shape (file→model) 1: features.block2.0.weight (32, 16, 5, 5)→(32, 16, 3, 3)" in msg
    # the head may differ (other classes): it is trained from initialisation anyway
    state = _state(trunk)
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(1000, 32), torch.zeros(1000)
    torch.save(state, "other-head.pt")
    ok = train.fit(cfg(scheme="none", trainable="head", weights="other-head.pt", epochs=1), progress=False)
    assert ok.metrics.public_data["source"] == "external"  # no model.json beside it: provenance not checkable


def test_a_trunk_that_saw_private_data_cannot_start_a_private_fine_tune(tiny):
    train.run(cfg(scheme="none", epochs=1, name="private-trunk"), progress=False)  # trained on the private set
    with pytest.raises(UserError, match=r"its trunk cannot start a private fine-tuning: .*does not say public: true"):
        train.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, trainable="head", weights="models/private-trunk/model.pt"),
            progress=False,
        )
    # a "public" set that overlaps the private one is refused both for the trunk and for the fine-tune
    import numpy as np

    from dpcam.data import store

    pub = make_public_tiny()
    images = np.load(pub / "images.npy")
    images[3] = np.load("data/prepared/tiny/images.npy")[10]
    np.save(pub / "images.npy", images)
    with pytest.raises(UserError, match=r"overlaps the private set data/prepared/tiny: 1 of its 240 images"):
        train.fit(cfg(scheme="none", public=True, epochs=1), progress=False)
    assert store.load_dataset(pub).manifest["public"] is True


def test_laplace_paper_says_no_guarantee_in_train_json_mlflow_and_the_cli(tiny):
    import mlflow

    res = CliRunner().invoke(
        app,
        ["train", "--dataset", "tiny", "--scheme", "laplace-paper", "--epsilon", "2", "--delta", "1e-3"]
        + ["--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    out = res.output
    assert "NO GUARANTEE: the paper's replica" in out  # (and a warning line when warnings are shown)
    assert re.search(r"(?<!nominal )ε = 2", out) is None  # no ε is printed for it: 2 is only the nominal ε
    name = "laplace-paper-nominal2-smallcnn-s0"
    saved = json.loads(Path(f"models/{name}/train.json").read_text())
    assert saved["guarantee"] == "none" and "C·√d" in saved["guarantee_reason"]
    assert saved["epsilon"] is None and saved["target_epsilon"] is None and saved["delta"] is None
    assert saved["nominal_epsilon"] == 2 and saved["nominal_delta"] == 1e-3 and saved["epsilon_l1_bound"] > 2
    mlflow.set_tracking_uri(tracking.tracking_uri())
    r = mlflow.get_run(saved["mlflow_run_id"])
    assert r.data.tags["dpcam.guarantee"] == "none"
    assert "epsilon" not in r.data.params and r.data.params["nominal_epsilon"] == "2"
    assert r.data.params["guarantee"] == "none"
    assert "epsilon" not in r.data.metrics and "epsilon_spent" not in r.data.metrics


def test_fine_tuning_flags_need_weights():
    with pytest.raises(ValueError, match="trainable = 'head' fine-tunes a pretrained trunk: give its weights"):
        cfg(trainable="head")
    with pytest.raises(ValueError, match="public = true trains on the public set"):
        cfg(scheme="ldp", ldp="x", public=True)
    assert cfg(public=True).data_dir == Path("data/prepared/tiny-public")
    assert cfg(scheme="laplace-paper", epsilon=5).run_name == "laplace-paper-nominal5-smallcnn-s0"


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
    first = {r.run_name: r for r in train.run_family("gaussian", grid, base, progress=False)}
    kept, lost = (Path(f"models/gaussian/{n}") for n in sorted(first))
    kept_inode = (kept / "model.pt").stat().st_ino
    (lost / "train.json").unlink()  # this run did not finish
    again = {r.run_name: r for r in train.run_family("gaussian", grid, base, progress=False)}
    assert (kept / "model.pt").stat().st_ino == kept_inode  # not trained again
    assert (lost / "train.json").is_file() and again[lost.name].mlflow_run_id != first[lost.name].mlflow_run_id
    assert again[lost.name].val_curve == first[lost.name].val_curve  # the same seed gives the same run
    assert again[kept.name] == first[kept.name]
    # another configuration: every run is trained again; a run no longer in the grid is removed
    changed = train.run_family("gaussian", grid.model_copy(update={"seeds": [0]}), base.model_copy(update={"lr": 0.4}))
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
        train._code_digest.cache_clear()
        return train._code_digest()

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
        train._code_digest.cache_clear()


# ------------------------------------------------------------------------------ issue 25: numbers, families, faults


def _mlflow_runs(experiment: str) -> dict[str, str]:
    """Run name -> status of every run of ``experiment`` in the current folder's store."""
    from mlflow.tracking import MlflowClient

    tracking._setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return {r.info.run_name: r.info.status for r in runs}


def test_a_diverging_training_stops_with_one_line_and_ends_failed(tiny):
    """Issue 25, case 4: a training whose loss turned NaN or inf went on and ended FINISHED with NaN weights."""
    args = ["train", *TRAIN_ARGS[:2], "--scheme", "none", "--device", "cpu", "--epochs", "1", "--lr", "1e30"]
    res = CliRunner().invoke(app, [*args, "--batch-size", "32", "--name", "div"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: div: training diverged in epoch 1 (loss = nan"), lines
    assert "lr = 1e+30 is too large" in lines[0]
    assert _mlflow_runs("tiny") == {"div": "FAILED"}
    assert not Path("models/div").exists()  # no weights, no checkpoint to --resume into the same divergence


def test_a_grid_that_drops_a_family_removes_its_runs_saying_how_many_and_an_empty_seed_list_is_refused(tiny):
    """Issue 25, case 4: `grid.seeds: []` made `dpcam train --family gaussian` exit 0 and delete every trained
    model of the family. An empty seeds (or models) list is refused before anything is touched; a family the
    grid drops (its own list emptied) has its runs removed, and the command says how many."""
    import yaml

    grid = tiny_grid(gaussian=[2, 5], executor="serial")
    base = cfg(scheme="gaussian", epochs=1, delta=1e-3)
    trained = sorted(r.run_name for r in train.run_family("gaussian", grid, base, progress=False))
    before = {p: p.read_bytes() for p in sorted(Path("models/gaussian").rglob("*")) if p.is_file()}
    Path("params.yaml").write_text(yaml.safe_dump({"grid": {**grid.model_dump(mode="json"), "seeds": []}}))
    res = CliRunner().invoke(app, ["train", "--family", "gaussian"])
    assert res.exit_code == 2 and res.output.startswith("error: params.yaml: grid.seeds = []: empty; "), res.output
    assert {p: p.read_bytes() for p in sorted(Path("models/gaussian").rglob("*")) if p.is_file()} == before
    with pytest.warns(UserWarning, match=r"family gaussian: removed 2 trained runs from models/gaussian .*"):
        assert train.run_family("gaussian", grid.model_copy(update={"gaussian": []}), base, progress=False) == []
    assert [p.name for p in Path("models/gaussian").iterdir()] == [] and len(trained) == 2


def test_a_run_a_killed_process_left_running_is_ended_killed_when_the_stage_reruns_it(tiny):
    """Issue 25, case 7: a SIGKILLed run stayed RUNNING in MLflow beside its retrained copy. A killed process
    leaves its run's id in the run folder (and its checkpoint); the stage that trains the run again ends it."""
    from mlflow.tracking import MlflowClient

    grid, base = tiny_grid(executor="serial"), cfg(scheme="gaussian", epochs=1, delta=1e-3)
    folder = Path("models/gaussian/gaussian-eps2-smallcnn-s0")
    folder.mkdir(parents=True)
    tracking._setup()
    killed = MlflowClient().create_run(tracking._experiment_id("tiny"), run_name=folder.name).info.run_id
    (folder / train.RUN_ID_FILE).write_text(killed + "\n")  # what a SIGKILLed run leaves
    (record,) = train.run_family("gaussian", grid, base, progress=False)
    assert _status(killed) == "KILLED" and _status(record.mlflow_run_id) == "FINISHED"
    assert not (folder / train.RUN_ID_FILE).exists()  # a run that ended leaves no id file behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_from_params_yaml_is_named_as_its_key_not_as_a_flag(tiny):
    """Issue 25, case 7: `train.device: cuda` in params.yaml was reported as "--device cuda"."""
    import yaml

    Path("params.yaml").write_text(yaml.safe_dump({"train": {"dataset": "tiny", "device": "cuda", "epochs": 1}}))
    res = CliRunner().invoke(app, ["train"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: params.yaml: train.device = cuda: no CUDA device is available here; set it to cpu or auto "
        "(or override it with --device cpu)"
    ]
    res = CliRunner().invoke(app, ["train", "--device", "cuda"])
    assert res.output.strip().splitlines() == [
        "error: --device cuda: no CUDA device is available here; use --device cpu or auto"
    ]
    assert not Path("models").exists() and not Path("mlruns").exists()


def test_a_file_size_limit_while_training_is_one_line_naming_the_file(tiny):
    """Issue 25, case 5: `ulimit -f` during `dpcam train` was an `OSError [Errno 27] File too large` traceback.
    A resnet18 checkpoint (about 90 MB) meets an 8 MB limit that the tracking store stays under."""
    import resource
    import subprocess
    import sys

    limit = 8 << 20

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["--dataset", "tiny", "--scheme", "none", "--model", "resnet18", "--epochs", "1", "--batch-size", "64"]
    out = subprocess.run(
        [sys.executable, "-m", "dpcam", "train", *args, "--device", "cpu", "--name", "big"],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "error: models/big/checkpoint.pt: file too large to write (the file-size limit of this process, `ulimit -f`, "
        "stops it); raise the limit (`ulimit -f unlimited`) and run the command again"
    ], out.stderr
    assert _mlflow_runs("tiny") == {"big": "FAILED"}
    assert not Path("models").exists() or list(Path("models").rglob("*")) == []  # no temporary file left


def test_on_patient_grouped_data_the_guarantee_is_stated_per_patient(tmp_path, monkeypatch):
    import math

    monkeypatch.chdir(tmp_path)
    make_tiny("grouped", per_patient=3)
    base = dict(dataset="grouped", scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1)
    with pytest.raises(UserError, match=r"groups images by patient .* set train.max_group_images .* largest: 3\)"):
        train.fit(cfg(**base), progress=False)
    with pytest.raises(UserError, match=r"patient patient\d+ has 3 training images, more than .*max_group_images = 2"):
        train.fit(cfg(**base, max_group_images=2), progress=False)
    m = train.fit(cfg(**base, max_group_images=3), progress=False).metrics
    assert (m.privacy_unit, m.group_size) == ("group", 3)
    assert m.group_epsilon == pytest.approx(3 * m.epsilon)
    assert m.group_delta == pytest.approx(3 * math.exp(2 * m.epsilon) * m.delta)
    make_tiny()
    plain = train.fit(cfg(**{**base, "dataset": "tiny"}), progress=False).metrics
    assert plain.privacy_unit == "image" and plain.group_epsilon is None
