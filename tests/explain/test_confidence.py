"""The paper's confidence metrics on hand-made models and maps with known answers; the masking baselines
(mask sensitivity, random maps) of the matched comparisons."""

import pytest
import torch

from dpcam.explain.confidence import confidence_drop, masking_baselines, random_maps
from dpcam.explain.streaming import RunningMean, finalize
from tests.explain.toys import ELSEWHERE, REGION, ProbModel, brightness, bump, region_model, scene

# ------------------------------------------------------------------------------ confidence


def _confidence_case():
    """4 images (3×4×4) with hand-computed Y, O: see the comments."""
    half = torch.zeros(4, 4)
    half[:, :2] = 1.0
    x = torch.stack([torch.full((3, 4, 4), v) for v in (0.8, 0.8, 0.6, 1.0)])
    maps = torch.stack([half, half, torch.ones(4, 4), torch.full((4, 4), 0.25)])
    target = torch.tensor([1, 0, 1, 1])
    labels = torch.tensor([1, 0, 1, 1])
    # img0: Y = .8, O = .4 → drop 50, no increase, score 40, x̃ predicted 0 ≠ 1
    # img1: Y = .2, O = .6 → drop 0, increase, score 60, x̃ predicted 0 = 0
    # img2: Y = O = .6 → drop 0, no increase (equal), score 60, x̃ predicted 1 = 1
    # img3: Y = 1, O = .25 → drop 75, no increase, score 25, x̃ predicted 0 ≠ 1
    return x, maps, target, labels


def test_confidence_drop_hand_computed():
    x, maps, target, labels = _confidence_case()
    out = confidence_drop(ProbModel(brightness), x, maps, target, labels)
    torch.testing.assert_close(out["Y"], torch.tensor([0.8, 0.2, 0.6, 1.0]))
    torch.testing.assert_close(out["O"], torch.tensor([0.4, 0.6, 0.6, 0.25]))
    torch.testing.assert_close(out["avg_drop_pct"], torch.tensor([50.0, 0.0, 0.0, 75.0]))
    assert out["increase_conf_pct"].tolist() == [0.0, 100.0, 0.0, 0.0]
    torch.testing.assert_close(out["masked_score_pct"], torch.tensor([40.0, 60.0, 60.0, 25.0]))
    assert out["masked_accuracy_pct"].tolist() == [0.0, 100.0, 100.0, 0.0]
    means = RunningMean().add(out).result()
    assert means["avg_drop_pct"] == pytest.approx(31.25, abs=1e-4)
    assert means["increase_conf_pct"] == 25.0
    assert means["masked_score_pct"] == pytest.approx(46.25, abs=1e-4)
    assert means["masked_accuracy_pct"] == 50.0


def test_confidence_streaming_and_probs_shortcut_agree():
    x, maps, target, labels = _confidence_case()
    model = ProbModel(brightness)
    whole = RunningMean().add(confidence_drop(model, x, maps, target, labels)).result()
    probs = torch.softmax(model(x), 1)
    run = RunningMean()
    for sl in (slice(0, 1), slice(1, 4)):
        run.add(confidence_drop(model, x[sl], maps[sl], target[sl], labels[sl], probs=probs[sl]))
    resumed = RunningMean()
    resumed.load_state_dict(run.state_dict())
    for k, v in whole.items():
        assert resumed.result()[k] == pytest.approx(v, abs=1e-5)
        assert finalize(run.sums, run.counts)[k] == pytest.approx(v, abs=1e-5)


def test_model_that_ignores_input_scores_no_drop_and_no_increase():
    x, maps, target, _ = _confidence_case()
    const = ProbModel(lambda x: torch.full((x.shape[0],), 0.7))
    out = confidence_drop(const, x, maps, target)
    assert torch.equal(out["avg_drop_pct"], torch.zeros(4))
    assert torch.equal(out["increase_conf_pct"], torch.zeros(4))  # O == Y is not an increase
    assert "masked_accuracy_pct" not in out  # no labels given


def test_zero_probability_gives_zero_drop_not_nan():
    x = torch.zeros(1, 3, 2, 2)  # brightness 0 → Y(class 1) = 0
    out = confidence_drop(ProbModel(brightness), x, torch.ones(1, 2, 2), torch.tensor([1]))
    assert out["avg_drop_pct"].tolist() == [0.0]


# ------------------------------------------------------------------------------ masking baselines


def test_random_map_is_a_seeded_permutation_of_each_map():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([7, 8, 9])
    r = random_maps(maps, idx, seed=0)
    for i in range(3):
        assert torch.equal(r[i].flatten().sort().values, maps[i].flatten().sort().values)  # the same values
        assert not torch.equal(r[i], maps[i])
    assert torch.equal(r, random_maps(maps, idx, seed=0))  # reruns are identical
    assert torch.equal(r[1:2], random_maps(maps[1:2], idx[1:2], seed=0))  # whatever the batch
    assert not torch.equal(r, random_maps(maps, idx, seed=1))
    assert not torch.equal(r[0], random_maps(maps[:1], torch.tensor([8]), seed=0)[0])  # seeded by the index


def test_mask_sensitivity_by_hand():
    """p = mean brightness: the constant map m̄ gives O_u = m̄ · Y, so the sensitivity is 100 · (1 − m̄)."""
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = masking_baselines(ProbModel(brightness), x, maps, torch.ones(3, dtype=torch.long), torch.arange(3))
    mean = maps.mean(dim=(1, 2))
    assert torch.allclose(out["Y"], brightness(x))
    assert torch.allclose(out["O_uniform"], mean * brightness(x), atol=1e-6)
    assert torch.allclose(out["mask_sensitivity_pct"], 100 * (1 - mean), atol=1e-4)
    # on a uniform image this model sees only a map's mass: the random map then scores like the constant one
    flat = masking_baselines(
        ProbModel(brightness), torch.full_like(x, 0.6), maps, torch.ones(3).long(), torch.arange(3)
    )
    assert torch.allclose(flat["O_random"], flat["O_uniform"], atol=1e-6)


def test_mask_sensitivity_is_zero_for_a_model_blind_to_the_intensity_scale():
    """p = f(x / mean x): dimming the image by any constant changes nothing, so the constant map costs nothing
    (up to float rounding), while the paper's Average Drop of an informative map still moves."""

    def contrast(x):
        z = x / x.mean(dim=(1, 2, 3), keepdim=True)
        return torch.sigmoid(3 * (z[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)) - 1))

    model, x, idx = ProbModel(contrast), scene(), torch.arange(4)
    target = torch.ones(4, dtype=torch.long)
    maps = bump(ELSEWHERE)[None].expand(4, 32, 32)
    out = masking_baselines(model, x, maps, target, idx)
    assert torch.all(out["mask_sensitivity_pct"] < 1e-4)
    assert torch.all(confidence_drop(model, x, maps, target)["avg_drop_pct"] > 10)


def test_random_map_baseline_differs_from_the_real_map_and_is_reproducible():
    """The region model keeps its evidence under the map that covers it (no drop) and loses most of it under
    the same values in random places."""
    model, x, idx = region_model(), scene(), torch.arange(10, 14)
    target = torch.ones(4, dtype=torch.long)
    maps = torch.zeros(4, 32, 32)
    maps[:, REGION[0], REGION[1]] = 1.0
    real = confidence_drop(model, x, maps, target)
    out = masking_baselines(model, x, maps, target, idx)
    assert torch.all(real["avg_drop_pct"] < 1e-4) and torch.all(out["avg_drop_random_pct"] > 80)
    assert torch.all(out["masked_score_random_pct"] < real["masked_score_pct"] - 50)
    assert torch.all(out["increase_conf_random_pct"] == 0)
    again = masking_baselines(model, x, maps, target, idx)
    for key in out:
        assert torch.equal(out[key], again[key]), key
