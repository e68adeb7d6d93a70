"""The degenerate-model check on hand-made predictions: healthy, one-class, near-chance and input-insensitive
models, imbalanced data, streaming."""

import math

import pytest
import torch

from dpcam.errors import UserError
from dpcam.explain.degeneracy import DegeneracyStats, degenerate


def _probs_for(preds, num_classes, confidence=0.7):
    p = torch.full((len(preds), num_classes), (1 - confidence) / (num_classes - 1))
    p[torch.arange(len(preds)), torch.as_tensor(preds)] = confidence
    return p


def test_degenerate_healthy_model():
    labels = torch.arange(100) % 2
    preds = labels.clone()
    preds[:10] = 1 - preds[:10]  # 90% accurate, balanced
    out = degenerate(_probs_for(preds, 2, 0.9), labels)
    assert out["degenerate"] is False and out["reasons"] == []
    assert out["accuracy"] == pytest.approx(0.9) and out["majority_share"] == pytest.approx(0.5)
    assert out["pred_entropy"] == pytest.approx(1.0) and out["pred_histogram"] == [50, 50]


def test_degenerate_one_class_model():
    labels = torch.arange(100) % 2
    probs = torch.stack([torch.linspace(0.6, 0.9, 100), 1 - torch.linspace(0.6, 0.9, 100)], 1)  # always class 0
    out = degenerate(probs, labels)
    assert out["degenerate"] is True
    assert out["majority_share"] == 1.0 and out["majority_class"] == 0 and out["pred_entropy"] == 0.0
    assert any(r.startswith("one class") for r in out["reasons"]) and any(
        r.startswith("near chance") for r in out["reasons"]
    )
    assert not any(r.startswith("input-insensitive") for r in out["reasons"])


def test_degenerate_near_chance_only():
    i = torch.arange(160)
    labels = i % 4
    preds = (labels + (i // 4) % 4) % 4  # right for one block of 4 in every 16 → accuracy 0.25
    out = degenerate(_probs_for(preds, 4), labels)
    assert out["accuracy"] == pytest.approx(0.25) and out["chance"] == pytest.approx(0.25)
    assert [r.split(":")[0] for r in out["reasons"]] == ["near chance"]


def test_degenerate_input_insensitive_only():
    labels = torch.arange(100) % 2
    eps = torch.where(labels == 1, -1e-3, 1e-3)
    probs = torch.stack([0.5 + eps, 0.5 - eps], 1)  # always right, but outputs barely move
    out = degenerate(probs, labels)
    assert out["accuracy"] == 1.0
    assert out["input_sensitivity"] == pytest.approx(math.sqrt(2) * 1e-3, rel=1e-4)
    assert [r.split(":")[0] for r in out["reasons"]] == ["input-insensitive"]


def test_degenerate_imbalanced_data_followed_by_a_good_model_is_not_flagged():
    labels = torch.tensor([0] * 92 + [1] * 8)
    out = degenerate(_probs_for(labels, 2, 0.9), labels)
    assert out["chance"] == pytest.approx(0.92) and out["degenerate"] is False


def test_degeneracy_stats_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(50, 3, generator=gen), 1)
    labels = torch.randint(0, 3, (50,), generator=gen)
    stats = DegeneracyStats(3)
    for k in range(0, 50, 7):
        stats.add(probs[k : k + 7], labels[k : k + 7])
    restored = DegeneracyStats(3)
    restored.load_state_dict(stats.state_dict())
    one = degenerate(probs, labels)
    for key, v in restored.result().items():
        assert v == pytest.approx(one[key]), key
    with pytest.raises(UserError, match="0 images"):
        DegeneracyStats(3).result()
