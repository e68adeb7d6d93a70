import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpcam import tracking
from dpcam.cli import app
from dpcam.config import ExplainConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.explain.score import score
from dpcam.train import stage as train_stage
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
    train_stage.run(cfg, progress=False)
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


@pytest.mark.slow
def test_explain_writes_metrics_maps_and_pictures(in_runs):
    none, dp = in_runs
    r = score(dp, ExplainConfig(device="cpu", batch_size=16), progress=False)
    for key in (
        "avg_drop_pct",
        "increase_conf_pct",
        "masked_score_pct",
        "masked_accuracy_pct",
        "confidence_y",
        "mask_sensitivity_pct",
        "avg_drop_random_pct",
        "increase_conf_random_pct",
        "masked_score_random_pct",
        "deletion_auc",
        "insertion_auc",
        "road_morf_auc",
        "road_lerf_auc",
        "road_gap",
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


@pytest.mark.slow
def test_several_methods_each_saved_and_scored_and_compared(in_runs):
    dp = in_runs[1]
    metrics = ["confidence", "map-agreement", "randomisation"]
    alone = score(dp, ExplainConfig(device="cpu", batch_size=16, metrics=metrics, methods=["gradcam"]), progress=False)
    maps_alone = np.load(Path("metrics") / dp / "maps.npy")
    methods = ["gradcam", "integrated-gradients", "occlusion"]
    cfg = ExplainConfig(device="cpu", batch_size=16, metrics=metrics, methods=methods, ig_steps=2, occlusion_window=4)
    head = score(dp, cfg, progress=False)
    folder = Path("metrics") / dp
    # the headline method's files are where a single method's are, with the same numbers and maps
    assert head["method"] == "gradcam" and head["methods"] == methods and "methods" not in alone.to_json()
    assert head["avg_drop_pct"] == alone["avg_drop_pct"] and np.array_equal(np.load(folder / "maps.npy"), maps_alone)
    for m in methods[1:]:
        record = json.loads((folder / "methods" / m / "explain.json").read_text())
        assert record["method"] == m and record["images"] == 48 and "methods" not in record
        assert {"avg_drop_pct", "map_agreement", "randomisation_agreement"} <= set(record)
        assert np.load(folder / "methods" / m / "maps.npy").shape == (48, 16, 16)
        assert (folder / "methods" / m / "per_image.npz").is_file() and (folder / "methods" / m / "cams.png").is_file()
    agreement = np.load(folder / "methods" / "agreement.npz")
    pairs = ["gradcam|integrated-gradients", "gradcam|occlusion", "integrated-gradients|occlusion"]
    assert sorted(agreement.files) == sorted(["index", *pairs])
    assert np.array_equal(agreement["index"], np.load(folder / "map_indices.npy"))
    rho = agreement["gradcam|occlusion"]
    assert rho.shape == (48,) and np.nanmin(rho) >= -1 and np.nanmax(rho) <= 1


@pytest.mark.slow
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


@pytest.mark.slow
def test_non_private_run_skips_agreement_with_a_note(in_runs):
    r = score(in_runs[0], ExplainConfig(device="cpu", metrics=["confidence", "map-agreement"]), progress=False)
    assert "map_agreement" not in r and any("non-private run" in n for n in r["notes"])


@pytest.mark.slow
def test_metrics_reach_the_training_mlflow_run(in_runs):
    import mlflow

    score(in_runs[1], ExplainConfig(device="cpu", metrics=["confidence"]), progress=False)
    run_id = json.loads((Path("models") / in_runs[1] / "train.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    r = mlflow.get_run(run_id)
    assert "avg_drop_pct" in r.data.metrics and "degenerate" in r.data.metrics and "test_accuracy" in r.data.metrics
    assert r.info.status == "FINISHED"


@pytest.mark.slow
def test_explain_by_mlflow_run_id_and_figure_cams(in_runs):
    run_id = json.loads((Path("models") / in_runs[0] / "train.json").read_text())["mlflow_run_id"]
    res = CliRunner().invoke(app, ["explain", run_id, "--device", "cpu", "--metric", "confidence"])
    assert res.exit_code == 0, res.output
    assert in_runs[0] in res.output
    score(in_runs[1], ExplainConfig(device="cpu", metrics=["confidence"]), progress=False)
    res = CliRunner().invoke(app, ["figure", "cams", "--runs", f"{in_runs[1]},{in_runs[0]}", "--images", "3"])
    assert res.exit_code == 0, res.output
    assert Path("reports/figures/cams.png").stat().st_size > 0


@pytest.mark.slow
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
        (["explain", "none-epsinf-smallcnn-s0", "--method", "gradcam", "--method", "gradcam"], "listed twice"),
        (["explain", "none-epsinf-smallcnn-s0", "--method", "scorecam", "--layer", "nothing"], "'nothing'"),
        (["explain", "none-epsinf-smallcnn-s0", "--target", "both"], "explain.target = 'both'"),
        (["explain", "none-epsinf-smallcnn-s0", "--layer", "features.nothing"], "features.nothing"),
        (["explain", "none-epsinf-smallcnn-s0", "--steps", "1"], "--steps: explain.steps = 1"),
        (["figure", "cams", "--runs", "nope"], "unknown run 'nope'"),
    ],
)
@pytest.mark.slow
def test_bad_explain_input_is_one_line(in_runs, args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ") and message in res.output


@pytest.mark.slow
def test_missing_model_file_is_reported(in_runs, tmp_path):
    Path("models/broken").mkdir()
    Path("models/broken/model.json").write_text("{}")
    with pytest.raises(UserError, match="no trained model"):
        score("broken", ExplainConfig(device="cpu"))


def _recompute(name: str, cfg: ExplainConfig, batch_size: int) -> dict[str, float]:
    """Every metric of explain.json from maps.npy + map_indices.npy + the models + the dataset, by the public
    metric functions (not the stage's code): the saved float16 maps are what the metrics see."""
    import torch

    from dpcam.data.store import ImageDataset, load_dataset
    from dpcam.explain.agreement import map_agreement
    from dpcam.explain.confidence import confidence_drop, masking_baselines
    from dpcam.explain.faithfulness import deletion_insertion, road
    from dpcam.explain.gradcam import gradcam, random_init_copy
    from dpcam.explain.inputs import as_saved, predict_probs
    from dpcam.explain.localisation import energy_pointing_game, has_mask, pointing_game
    from dpcam.explain.streaming import RunningMean
    from dpcam.saved import load_model

    folder = Path("metrics") / name
    saved = torch.from_numpy(np.load(folder / "maps.npy").astype(np.float32))
    idx = np.load(folder / "map_indices.npy")
    model, spec = load_model(name)
    images = ImageDataset(load_dataset(spec["data_dir"]), idx, with_masks=True)  # the saved images, in order
    reference = load_model("none-epsinf-smallcnn-s0")[0]
    randomised = random_init_copy(model, cfg.seed)
    run = RunningMean()
    for start in range(0, idx.size, batch_size):
        sl = slice(start, start + batch_size)
        x, y, masks = images.batch(np.arange(idx.size)[sl])
        maps = saved[sl]
        probs = predict_probs(model, x)
        target = probs.argmax(1)
        c = confidence_drop(model, x, maps, target, y, probs=probs)
        d, i = deletion_insertion(model, x, maps, target, steps=cfg.steps, probs=probs)
        index = torch.from_numpy(idx[sl])  # the images' dataset indices seed their random maps and ROAD noise
        base = masking_baselines(model, x, maps, target, index, cfg.seed, probs=probs)
        roads = road(model, x, maps, target, index, cfg.seed)
        hits, valid = pointing_game(maps, masks)
        ref = as_saved(gradcam(reference, x, target=target)[0])
        rnd = as_saved(gradcam(randomised, x, target=target)[0])
        agreement, randomisation = map_agreement(maps, ref), map_agreement(maps, rnd)
        values = {k: c[k] for k in ("avg_drop_pct", "increase_conf_pct", "masked_score_pct", "masked_accuracy_pct")}
        values |= {"confidence_y": c["Y"]}
        values |= {k: base[k] for k in ("mask_sensitivity_pct", "avg_drop_random_pct", "increase_conf_random_pct")}
        values |= {"masked_score_random_pct": base["masked_score_random_pct"]}
        values |= {k: roads[k] for k in ("road_morf_auc", "road_lerf_auc", "road_gap")}
        values |= {"deletion_auc": d, "insertion_auc": i, "pointing_game": hits}
        values |= {"energy_pointing_game": energy_pointing_game(maps, masks)}
        values |= {"map_agreement": agreement, "randomisation_agreement": randomisation}
        lesions = has_mask(masks)
        ok = {"pointing_game": valid, "energy_pointing_game": lesions}
        ok |= {"map_agreement": torch.isfinite(agreement), "randomisation_agreement": torch.isfinite(randomisation)}
        run.add(values, ok)
    return run.result()


@pytest.mark.slow
def test_every_explain_number_is_recomputed_exactly_from_the_saved_maps(in_runs):
    """The metrics see the float16 maps the stage saves, and the means are exact sums: maps.npy, map_indices.npy,
    the models and the dataset give explain.json's numbers to the last bit. Failed before: the metrics saw the
    float32 maps (e.g. avg_drop_pct 7.231930 in the file, 7.232224 from the saved maps)."""
    none, dp = in_runs
    cfg = ExplainConfig(device="cpu", batch_size=16)
    record = score(dp, cfg, progress=False)
    written = json.loads((Path("metrics") / dp / "explain.json").read_text())
    again = _recompute(dp, cfg, cfg.batch_size)  # the stage's batches: the model's forward is the same computation
    assert len(again) == 18 and all(isinstance(written[k], float) for k in again)
    for key, value in again.items():
        assert written[key] == value and record[key] == value, key  # exactly, not approximately
    # other batches: the metrics of the maps alone are still exact (the sums do not depend on the batching); the
    # model's float32 forward may round differently for another batch size (on this CPU it does not, here)
    for batch_size in (5, 48):
        other = _recompute(dp, cfg, batch_size)
        for key, value in other.items():
            if key in ("pointing_game", "energy_pointing_game"):
                assert written[key] == value, key
            else:
                assert written[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_matched_inputs_and_road_land_in_per_image_values_and_can_be_turned_off(in_runs):
    """The new keys are per-image values (per_image.npz) whose means are explain.json's numbers; a metric left
    out of explain.metrics writes neither."""
    import math

    dp = in_runs[1]
    keys = ("confidence_y", "mask_sensitivity_pct", "avg_drop_random_pct", "road_morf_auc", "road_gap")
    r = score(dp, ExplainConfig(device="cpu", batch_size=16), progress=False)
    per_image = np.load(Path("metrics") / dp / "per_image.npz")
    for key in keys:
        v = per_image[key]
        assert v.shape == (48,) and np.isfinite(v).all(), key
        assert r[key] == math.fsum(v.tolist()) / v.size, key
    assert 0 < r["confidence_y"] <= 1 and 0 <= r["mask_sensitivity_pct"] <= 100
    assert r["road_gap"] == pytest.approx(r["road_lerf_auc"] - r["road_morf_auc"], abs=1e-6)
    off = score(dp, ExplainConfig(device="cpu", metrics=["confidence", "deletion-insertion"]), progress=False)
    per_image = np.load(Path("metrics") / dp / "per_image.npz")
    assert "confidence_y" in off and "confidence_y" in per_image.files
    for key in keys[1:]:
        assert key not in off and key not in per_image.files, key


@pytest.mark.parametrize("family, expected", [("gaussian", ["gradcam", "occlusion"]), ("ldp", ["gradcam"])])
def test_only_the_headline_families_are_scored_with_every_method(monkeypatch, family, expected):
    from types import SimpleNamespace

    from dpcam import executor, families
    from dpcam.explain import score as stage
    from tests.conftest import tiny_grid

    run = SimpleNamespace(name="r", family=family, scheme="gaussian", seed=0, model="smallcnn", metrics_dir=Path("m"))
    monkeypatch.setattr(families, "family_runs", lambda *a, **k: [run])
    monkeypatch.setattr(tracking, "open_store", lambda: None)
    seen = {}
    monkeypatch.setattr(executor, "run_jobs", lambda fn, jobs, *a, **k: seen.setdefault("cfg", jobs[0][1]))
    cfg = ExplainConfig(methods=["gradcam", "occlusion"])
    stage.score_family(family, tiny_grid(), cfg, allow_data_change=True)
    assert seen["cfg"].methods == expected and cfg.methods == ["gradcam", "occlusion"]
