"""dpcam.train.stage: the train stage shell — MLflow tracking, outputs, signals, one-line errors."""

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpcam import tracking
from dpcam.cli import app
from dpcam.saved import load_model
from dpcam.train import fit as train_fit
from dpcam.train import stage as train_stage
from tests.conftest import make_tiny
from tests.train.conftest import TRAIN_ARGS, _mlflow_runs, _status, cfg


@pytest.mark.slow
def test_run_tracks_in_mlflow_and_writes_outputs(tiny):
    import mlflow

    m = train_stage.run(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False)
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
    # the Dataset column: the DVC-tracked images' digest, what trained; the experiment opens on its runs table
    (used,) = r.inputs.dataset_inputs
    images = json.loads(Path("data/prepared/tiny/manifest.json").read_text())["checksums"]["images.npy"]
    assert (used.dataset.name, used.dataset.digest) == ("tiny", images[:36])
    tags = {t.key: t.value for t in used.tags}
    assert tags["mlflow.data.context"] == "training" and tags["split"] == "train" and int(tags["images"]) > 0
    kind = mlflow.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"

    assert saved["mlflow_model_uri"].startswith("models:/")
    logged = tracking.load_model(saved["mlflow_model_uri"])
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(logged(x), model(x), atol=1e-5)
    assert type(logged) is type(model) and logged.gradcam_layer == model.gradcam_layer  # dpcam's module, not a trace


def test_failed_and_killed_runs_never_end_finished(tiny, monkeypatch):
    import mlflow

    seen = {}
    real_fit = train_fit.fit

    def failing_fit(c, **kw):
        seen["id"] = mlflow.active_run().info.run_id
        raise RuntimeError("boom")

    monkeypatch.setattr(train_stage, "fit", failing_fit)
    with pytest.raises(RuntimeError):
        train_stage.run(cfg(scheme="none", epochs=1), progress=False)
    assert _status(seen["id"]) == "FAILED"

    def terminated_fit(c, **kw):
        seen["id"] = mlflow.active_run().info.run_id
        os.kill(os.getpid(), signal.SIGTERM)
        return real_fit(c, **kw)

    monkeypatch.setattr(train_stage, "fit", terminated_fit)
    with pytest.raises(tracking.Terminated, match="signal 15"):
        train_stage.run(cfg(scheme="none", epochs=1, name="term"), progress=False)
    assert _status(seen["id"]) == "KILLED"


@pytest.mark.slow
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
            train_fit.fit(
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


@pytest.mark.slow
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


def _mlflow_grid(root: Path) -> dict[str, str]:
    """Train a small grid into ``root`` (its own folder and store); {run name: MLflow run id}."""
    from dpcam.config import LdpConfig
    from dpcam.data.ldp import derive

    derive(make_tiny(), "singh-sikka", 1, LdpConfig())
    real_validate = train_fit._validate

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
        mp.setattr(train_fit, "_validate", last_epoch_worse)
        return {c.run_name: train_stage.run(c, progress=False, grid="g").mlflow_run_id for c in runs}


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_mid_epoch_is_one_line_exit_143_killed_and_resumable(tiny, monkeypatch):
    real = train_fit._train_epoch

    def second_epoch_terminated(t, epoch, progress):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # raised here, at the start of the second epoch
        return real(t, epoch, progress)

    monkeypatch.setattr(train_fit, "_train_epoch", second_epoch_terminated)
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
    monkeypatch.setattr(train_fit, "_train_epoch", real)
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert _status(ckpt["mlflow_run_id"]) == "FINISHED"


@pytest.mark.slow
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


@pytest.mark.parametrize("folder", ["models", "models/ro"])
def test_a_read_only_output_folder_is_refused_before_training(tiny, monkeypatch, folder):
    from tests.readonly import read_only

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_stage, "fit", no_training)
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

    monkeypatch.setattr(train_stage, "fit", no_training)
    with read_only(*map(Path, paths)):
        res = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--epochs", "1", "--name", "ro"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not Path("models").exists()  # nothing half written


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
