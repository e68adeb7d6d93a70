"""Saved runs (dpcam.saved): what the train stage writes and explain, audit, search and report read back."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpcam import saved
from dpcam.cli import app
from dpcam.config import TrainConfig
from dpcam.errors import UserError
from tests.conftest import make_tiny


@pytest.fixture
def tiny():
    return make_tiny()


def test_a_saved_model_reloads_plain_and_in_eval_mode_with_its_description(tiny):
    from dpcam.data.store import load_dataset
    from dpcam.models import create_model

    model = create_model("smallcnn", 2, 16)
    saved.save_model(model, TrainConfig(dataset="tiny", scheme="none", device="cpu"), load_dataset(tiny), Path("m"))
    loaded, spec = saved.load_model("m")
    assert not loaded.training and (spec["model"], spec["num_classes"], spec["image_size"]) == ("smallcnn", 2, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(UserError, match=r"^run 'nope': no trained model at models/nope/model.pt; run `dpcam train`"):
        saved.load_model("nope")


def test_an_unavailable_cuda_device_is_one_line_naming_where_it_was_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert saved.resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match=r"^--device cuda: no CUDA device is available here; use --device cpu"):
        saved.resolve_device("cuda")
    with pytest.raises(UserError, match=r"^params.yaml: train.device = cuda: no CUDA device"):
        saved.resolve_device("cuda", "params.yaml: train.device")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "a pickled module", "another model's weights"])
def test_a_damaged_model_file_is_one_line_naming_it(tiny, damage):
    from dpcam.data.store import load_dataset
    from dpcam.models import create_model

    model, out = create_model("smallcnn", 2, 16), Path("models/r")
    out.mkdir(parents=True)
    saved.save_model(model, TrainConfig(dataset="tiny", scheme="none", device="cpu"), load_dataset(tiny), out)
    weights = out / "model.pt"
    if damage == "garbage":
        weights.write_bytes(b"not a model")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "a pickled module":
        torch.save(model, weights)  # torch's own message would suggest weights_only=False
    else:
        torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    with pytest.raises(UserError) as err:
        saved.load_model("r")
    msg = str(err.value)
    assert msg.startswith(f"{weights}: ") and "\n" not in msg and "weights_only" not in msg, msg
    if damage == "garbage":  # the explain and audit stages load through saved.load_model
        for stage in ("explain", "audit"):
            res = CliRunner().invoke(app, [stage, "r", "--device", "cpu"])
            assert res.exit_code == 2, res.output
            assert res.output.strip().splitlines() == [f"error: {msg}"]
