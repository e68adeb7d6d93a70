"""The method registry: Integrated Gradients and occlusion against hand computations on a linear model,
every method's contract on a real model, and the settings a user can get wrong."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dpcam import names
from dpcam.config import ExplainConfig
from dpcam.errors import UserError
from dpcam.explain.blur import blur_baseline
from dpcam.explain.gradcam import gradcam
from dpcam.explain.methods import METHODS, options_of
from dpcam.models import create_model


class Linear(nn.Module):
    """logit_c = Σ W[c] ⊙ x: every pixel's contribution to a logit is known exactly."""

    gradcam_layer = "conv"

    def __init__(self, shape=(3, 8, 8)) -> None:
        super().__init__()
        self.conv = nn.Identity()  # the layer a CAM would use; pixel methods ignore it
        self.w = nn.Parameter(torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", self.conv(x), self.w)


def _raw(method, model, x, target, **options):
    model.eval()
    with torch.enable_grad():
        return METHODS.lookup(method)(model, model.conv, x, target, **options)


def test_registry_is_the_names_list():
    assert tuple(METHODS) == names.EXPLAIN_METHODS


def test_integrated_gradients_is_exact_on_a_linear_model():
    model = Linear()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1])
    raw, logits, t = _raw("integrated-gradients", model, x, target, steps=4)
    # IG of a linear logit from baseline b is (x − b) ⊙ W[c] for any number of steps; b = the blurred image
    expected = ((x - blur_baseline(x)) * model.w[target]).abs().sum(dim=1)
    torch.testing.assert_close(raw, expected.detach())
    assert t.tolist() == [0, 1] and torch.allclose(logits, model(x).detach())


def test_occlusion_matches_hand_computation_on_a_linear_model():
    model = Linear((1, 4, 4))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    contribution = ((x - blur_baseline(x)) * model.w[1]).detach()[0, 0]  # what blurring each pixel costs logit 1
    raw, _, _ = _raw("occlusion", model, x, torch.tensor([1]), window=2, stride=1)
    expected = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            # windows (top-left r, c) with r ≤ i ≤ r + 1, c ≤ j ≤ c + 1, inside the 3 × 3 positions
            drops = [
                contribution[r : r + 2, c : c + 2].sum()
                for r in range(max(0, i - 1), min(2, i) + 1)
                for c in range(max(0, j - 1), min(2, j) + 1)
            ]
            expected[i, j] = torch.stack(drops).mean().abs()
    torch.testing.assert_close(raw[0], expected)


@pytest.mark.parametrize("method", names.EXPLAIN_METHODS)
def test_every_method_contract_on_smallcnn(method):
    model = create_model("smallcnn", 3, 32, seed=0, widths=(8, 16, 32, 32))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    options = options_of(method, ExplainConfig(ig_steps=4))
    maps, target, probs = gradcam(model, x, method=method, options=options)
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and not torch.isnan(maps).any()
    assert torch.equal(target, model.eval()(x).argmax(1))
    torch.testing.assert_close(probs, torch.softmax(model(x), 1).detach())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_options_come_from_the_explain_section():
    cfg = ExplainConfig(ig_steps=7, occlusion_window=6, occlusion_stride=3)
    assert options_of("integrated-gradients", cfg) == {"steps": 7}
    assert options_of("occlusion", cfg) == {"window": 6, "stride": 3}
    assert options_of("gradcam", cfg) == {}


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"methods": ["gradcam", "lime"]}, "unknown explanation method 'lime'"),
        ({"methods": []}, "name at least one explanation method"),
        ({"methods": ["occlusion", "occlusion"]}, "'occlusion' is listed twice"),
        ({"ig_steps": 1}, "greater than or equal to 2"),
        ({"occlusion_window": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_settings_are_refused_by_the_section(bad, words):
    with pytest.raises(ValidationError, match=words):
        ExplainConfig(**bad)


def test_occlusion_window_larger_than_the_image():
    cfg = ExplainConfig(methods=["gradcam", "occlusion"], occlusion_window=40)
    with pytest.raises(UserError, match=r"explain.occlusion_window = 40 is larger than the 32-pixel images"):
        cfg.check_image(32, "run r")
    ExplainConfig(methods=["gradcam"], occlusion_window=40).check_image(32, "run r")  # unused by Grad-CAM
    model = Linear()
    with pytest.raises(UserError, match="occlusion_window = 9 is larger than the 8×8 image"):
        _raw("occlusion", model, torch.rand(1, 3, 8, 8), None, window=9, stride=1)
