"""The metric registry: names, errors and needs, every metric identical whatever the batch size, and the
registry entries against the family functions."""

import pytest
import torch

from dpcam.errors import UserError
from dpcam.explain.confidence import masking_baselines
from dpcam.explain.faithfulness import road
from dpcam.explain.gradcam import gradcam, random_init_copy
from dpcam.explain.metrics import METRICS, ExplainBatch, get_metrics
from dpcam.explain.streaming import RunningMean
from dpcam.models import create_model
from tests.explain.toys import REGION, ProbModel, brightness, bump, region_model, scene


def test_registry_names_errors_and_needs():
    assert {
        "confidence",
        "masking-baselines",
        "deletion-insertion",
        "road",
        "pointing-game",
        "energy-pointing-game",
        "map-agreement",
        "randomisation",
    } <= set(METRICS)
    with pytest.raises(UserError, match="unknown explanation metric 'nope'; known: confidence"):
        get_metrics(["confidence", "nope"])
    batch = ExplainBatch(ProbModel(brightness), torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4), torch.tensor([1]))
    assert METRICS["pointing-game"].missing(batch) == ["masks"]
    with pytest.raises(UserError, match="needs masks"):
        METRICS["pointing-game"](batch)
    with pytest.raises(UserError, match="no option 'stepz'"):
        METRICS["deletion-insertion"](batch, stepz=3)
    for name in ("masking-baselines", "road"):  # their random numbers are seeded by the images' dataset indices
        assert METRICS[name].missing(batch) == ["indices"]


def test_all_metrics_identical_whatever_the_batch_size():
    model = create_model("smallcnn", 3, 32, seed=0)
    rand_model = random_init_copy(model, 1)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(10, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 3, (10,), generator=gen)
    masks = (torch.rand(10, 32, 32, generator=gen) > 0.9).float()
    masks[:3] = 0  # grade-0 images: no lesions
    reference = torch.rand(10, 32, 32, generator=gen)
    options = {"deletion-insertion": {"steps": 4}}

    def score(bs):
        run = RunningMean()
        for k in range(0, 10, bs):
            sl = slice(k, k + bs)
            maps, target, probs = gradcam(model, x[sl])
            rmaps, _, _ = gradcam(rand_model, x[sl], target=target)
            batch = ExplainBatch(
                model,
                x[sl],
                maps,
                target,
                probs=probs,
                labels=labels[sl],
                masks=masks[sl],
                reference_maps=reference[sl],
                random_maps=rmaps,
                indices=torch.arange(100, 110)[sl],
            )
            for metric in METRICS.values():
                run.add(*metric(batch, **options.get(metric.name, {})))
        return run

    a, b = score(10), score(3)
    assert a.counts == b.counts
    assert a.counts["pointing_game"] == 7 and a.counts["avg_drop_pct"] == 10
    for key, v in a.result().items():
        assert v is not None and b.result()[key] == pytest.approx(v, abs=1e-4), key


def test_registry_entries_of_the_new_metrics():
    model, x = region_model(), scene(2)
    maps = bump(REGION)[None].expand(2, 32, 32).contiguous()
    target = torch.ones(2, dtype=torch.long)
    batch = ExplainBatch(model, x, maps, target, labels=target, indices=torch.tensor([3, 4]))
    values, valid = METRICS["confidence"](batch)
    assert torch.allclose(values["confidence_y"], region_model()(x).softmax(1)[:, 1])
    values, valid = METRICS["masking-baselines"](batch, seed=0)
    assert set(values) == set(METRICS["masking-baselines"].keys) and valid == {}
    direct = masking_baselines(model, x, maps, target, batch.indices, 0)
    assert all(torch.equal(values[k], direct[k]) for k in values)
    values, valid = METRICS["road"](batch, seed=0)
    assert set(values) == {"road_morf_auc", "road_lerf_auc", "road_gap"} and valid == {}
    direct = road(model, x, maps, target, batch.indices, 0)
    assert all(torch.equal(values[k], direct[k]) for k in values)
