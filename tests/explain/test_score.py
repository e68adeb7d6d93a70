import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpcam import tracking, train
from dpcam.cli import app
from dpcam.config import ExplainConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.explain.score import score
from tests.conftest import make_tiny


def trained(scheme="none", **kw):
    base = dict(
        dataset="tiny",
        model="smallcnn",
        epochs=3,
        batch_size=32,
        lr=0.1,
        device="cpu",
        scheme=scheme,
        epsilon=2.0,
        delta=1e-3,
    )
    cfg = TrainConfig(**{**base, **kw})
    train.run(cfg, progress=False)
    return cfg.run_name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A non-private and a gaussian run on tiny data with masks (trained once for this module)."""
    import os

    root = tmp_path_factory.mktemp("runs")
    old = os.getcwd()
    os.chdir(root)
    try:
        make_tiny(masks=True)
        names = trained("none"), trained("gaussian")
    finally:
        os.chdir(old)
    return root, names


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs[0])
    return runs[1]


def test_explain_writes_metrics_maps_and_pictures(in_runs):
    none, dp = in_runs
    r = score(dp, ExplainConfig(device="cpu", batch_size=16), progress=False)
    for key in (
        "avg_drop_pct",
        "increase_conf_pct",
        "masked_score_pct",
        "masked_accuracy_pct",
        "deletion_auc",
        "insertion_auc",
        "pointing_game",
        "energy_pointing_game",
        "map_agreement",
        "randomisation_agreement",
    ):
        assert isinstance(r[key], float), key
    assert 0 <= r["avg_drop_pct"] <= 100 and -1 <= r["map_agreement"] <= 1
    assert set(r["degeneracy"]) >= {"accuracy", "majority_share", "pred_entropy", "input_sensitivity", "degenerate"}
    assert r["degenerate"] == r["degeneracy"]["degenerate"]
    folder = Path("metrics") / dp
    maps = np.load(folder / "maps.npy")
    idx = np.load(folder / "map_indices.npy")
    assert maps.dtype == np.float16 and maps.shape == (48, 16, 16) and idx.shape == (48,)
    assert maps.min() >= 0 and maps.max() <= 1
    assert json.loads((folder / "explain.json").read_text())["images"] == 48
    assert (folder / "cams.png").stat().st_size > 0


def test_streaming_does_not_depend_on_batch_size(in_runs):
    a = score(
        in_runs[1], ExplainConfig(device="cpu", batch_size=48, metrics=["confidence", "pointing-game"]), progress=False
    )
    maps_a = np.load(Path("metrics") / in_runs[1] / "maps.npy")
    b = score(
        in_runs[1], ExplainConfig(device="cpu", batch_size=7, metrics=["confidence", "pointing-game"]), progress=False
    )
    assert a["avg_drop_pct"] == pytest.approx(b["avg_drop_pct"], abs=1e-4)
    assert a["pointing_game"] == pytest.approx(b["pointing_game"])
    assert np.array_equal(maps_a, np.load(Path("metrics") / in_runs[1] / "maps.npy"))


def test_non_private_run_skips_agreement_with_a_note(in_runs):
    r = score(in_runs[0], ExplainConfig(device="cpu", metrics=["confidence", "map-agreement"]), progress=False)
    assert "map_agreement" not in r and any("non-private run" in n for n in r["notes"])


def test_metrics_reach_the_training_mlflow_run(in_runs):
    import mlflow

    score(in_runs[1], ExplainConfig(device="cpu", metrics=["confidence"]), progress=False)
    run_id = json.loads((Path("models") / in_runs[1] / "train.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    r = mlflow.get_run(run_id)
    assert "avg_drop_pct" in r.data.metrics and "degenerate" in r.data.metrics and "test_accuracy" in r.data.metrics
    assert r.info.status == "FINISHED"


def test_explain_by_mlflow_run_id_and_figure_cams(in_runs):
    run_id = json.loads((Path("models") / in_runs[0] / "train.json").read_text())["mlflow_run_id"]
    res = CliRunner().invoke(app, ["explain", run_id, "--device", "cpu", "--metric", "confidence"])
    assert res.exit_code == 0, res.output
    assert in_runs[0] in res.output
    score(in_runs[1], ExplainConfig(device="cpu", metrics=["confidence"]), progress=False)
    res = CliRunner().invoke(app, ["figure", "cams", "--runs", f"{in_runs[1]},{in_runs[0]}", "--images", "3"])
    assert res.exit_code == 0, res.output
    assert Path("reports/figures/cams.png").stat().st_size > 0


def test_dataset_without_masks_skips_mask_metrics(tmp_path):
    make_tiny()
    name = trained("none", epochs=1)
    r = score(name, ExplainConfig(device="cpu", metrics=["confidence", "pointing-game"]), progress=False)
    assert "pointing_game" not in r and any("no lesion masks" in n for n in r["notes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["explain", "nope"], "unknown run 'nope'"),
        (["explain", "none-epsinf-smallcnn-s0", "--metric", "beauty"], "unknown explanation metric 'beauty'"),
        (["explain", "none-epsinf-smallcnn-s0", "--method", "lime"], "unknown explanation method 'lime'"),
        (["explain", "none-epsinf-smallcnn-s0", "--target", "both"], "explain.target = 'both'"),
        (["explain", "none-epsinf-smallcnn-s0", "--layer", "features.nothing"], "features.nothing"),
        (["explain", "none-epsinf-smallcnn-s0", "--steps", "1"], "--steps: explain.steps = 1"),
        (["figure", "cams", "--runs", "nope"], "unknown run 'nope'"),
    ],
)
def test_bad_explain_input_is_one_line(in_runs, args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ") and message in res.output


def test_missing_model_file_is_reported(in_runs, tmp_path):
    Path("models/broken").mkdir()
    Path("models/broken/model.json").write_text("{}")
    with pytest.raises(UserError, match="no trained model"):
        score("broken", ExplainConfig(device="cpu"))
