"""dpcam.weights: a local state dict into a model — what fits, what is folded or frozen, one line for what does not."""

import logging

import pytest
import torch
from torchvision.models import resnet18 as tv_resnet18

from dpcam.errors import UserError
from dpcam.models import create_model
from dpcam.weights import load_weights

NUM_CLASSES = 3


def test_weights_round_trip(tmp_path):
    src = create_model("smallcnn", NUM_CLASSES, 32, seed=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = create_model("smallcnn", NUM_CLASSES, 32, seed=2, weights=tmp_path / "w.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), src(x))
    # a training checkpoint wrapping the state dict under "model", with Opacus's "_module." prefix
    wrapped = {"model": {f"_module.{k}": v for k, v in src.state_dict().items()}, "epoch": torch.tensor(3)}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    report = load_weights(create_model("smallcnn", NUM_CLASSES, 32, seed=3), tmp_path / "ckpt.pt")
    assert len(report.loaded) == len(src.state_dict()) and not report.skipped and not report.missing


def test_load_weights_alone_reports_what_does_not_fit(tmp_path, caplog):
    """Without ``required`` (the lenient door; create_model and fine-tuning are strict, tests/test_tvmodels.py) a
    torchvision resnet18 file loads what fits: BatchNorm as frozen BatchNorm, the small-input stem's 3×3 conv1
    reported, not crashed, in one warning; the 1000-class head is trained from initialisation."""
    from dpcam.layers import FrozenBatchNorm2d

    ref = tv_resnet18(weights=None, num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "imagenet.pt")
    with caplog.at_level(logging.WARNING, logger="dpcam.weights"):
        model = create_model("resnet18", 5, 64, seed=0)  # the small-input stem
        report = load_weights(model, tmp_path / "imagenet.pt")
    assert isinstance(model.bn1, FrozenBatchNorm2d) and len(report.frozen_batchnorm) == 20
    assert [s.split()[0] for s in report.shape_mismatch] == ["conv1.weight", "fc.weight", "fc.bias"]
    assert report.problems == ["conv1.weight (64, 3, 7, 7)→(64, 3, 3, 3)", "conv1.weight"]
    assert len(report.used) == 99 and len(report.ignored) == 20 and report.in_file == 122
    [record] = [r for r in caplog.records if r.name == "dpcam.weights"]
    assert "conv1.weight" in record.getMessage() and "the head is for another class count" in record.getMessage()


def test_bad_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        create_model("smallcnn", NUM_CLASSES, 32, weights=tmp_path / "missing.pt")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="none of its 1 tensors"):
        load_weights(create_model("smallcnn", NUM_CLASSES, 32), tmp_path / "other.pt")
    misfit = r"12 tensors of the trunk of SmallCNN do not fit \(missing 12: .*; unknown to the model 1: encoder"
    with pytest.raises(UserError, match=misfit):
        create_model("smallcnn", NUM_CLASSES, 32, weights=tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a weights-only torch file"):
        create_model("smallcnn", NUM_CLASSES, 32, weights=tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        create_model("smallcnn", NUM_CLASSES, 32, weights=tmp_path / "list.pt")


def test_fine_tuning_weights_must_hold_the_whole_trunk(tmp_path):
    from dpcam.models import frozen_keys

    src = create_model("smallcnn", NUM_CLASSES, 32, seed=1).state_dict()
    del src["features.block2.1.weight"]
    src["features.block1.0.bias"] = torch.zeros(7)
    src["classifier.weight"] = torch.zeros(10, 32)  # the head may differ: it is trained
    torch.save(src, tmp_path / "w.pt")
    model = create_model("smallcnn", NUM_CLASSES, 32, seed=2)
    trunk = frozen_keys(model, "head")
    with pytest.raises(UserError) as e:
        load_weights(model, tmp_path / "w.pt", required=trunk, only=trunk)
    msg = str(e.value)
    assert "2 tensors of the frozen trunk" in msg and "missing 1: features.block2.1.weight" in msg
    assert "features.block1.0.bias (7,)→(16,)" in msg
    # without the trunk's strictness (trainable all) it is a warning, as before
    report = load_weights(model, tmp_path / "w.pt")
    assert "features.block2.1.weight" in report.missing
    ok = create_model("smallcnn", NUM_CLASSES, 32, seed=1).state_dict()
    torch.save(ok, tmp_path / "ok.pt")
    head_before = model.classifier.weight.clone()
    report = load_weights(model, tmp_path / "ok.pt", required=trunk, only=trunk)
    assert report.excluded == ["classifier.weight", "classifier.bias"] and not report.missing
    assert torch.equal(model.classifier.weight, head_before)  # the head keeps its initialisation
