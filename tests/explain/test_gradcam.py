"""Grad-CAM maps: hand-computed values on a tiny conv model, scaling, batching, Opacus refusal, randomisation copy."""

import re

import pytest
import torch
from captum.attr import GuidedGradCam
from opacus import GradSampleModule
from torch.utils.data import DataLoader, TensorDataset

from dpcam import names
from dpcam.errors import UserError
from dpcam.explain.gradcam import gradcam, minmax_scale, random_init_copy
from dpcam.explain.methods import METHODS
from dpcam.models import create_model
from dpcam.privacy.engine import make_private
from tests.explain.toys import Tiny, U, tiny_input


def test_tiny_model_matches_hand_computed_maps():
    model, x = Tiny(), tiny_input()
    m = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    # class 0: map ∝ M + 0.5 (2 − M) = 0.5 M + 1 > 0; min–max of the upsampled map = that of U M Uᵀ (0 .. 4)
    expected0 = U @ m @ U.T / 4.0
    # class 1: −M + (2 − M) = 2 − 2M = [[2, 0], [−2, −6]] → ReLU [[2, 0], [0, 0]] → outer(u0, u0)
    u0 = U[:, 0]
    expected1 = torch.outer(u0, u0)
    maps, target, probs = gradcam(model, x.repeat(2, 1, 1, 1), target=torch.tensor([0, 1]))
    assert maps.shape == (2, 4, 4) and maps.dtype == torch.float32
    torch.testing.assert_close(maps[0], expected0)
    torch.testing.assert_close(maps[1], expected1)
    assert target.tolist() == [0, 1]
    # logits: class 0 = mean(A0) + 0.5 mean(A1) = 1.75 + 0.5 * 0.25; class 1 = -1.75 + 0.25
    logits = torch.tensor([1.75 + 0.125, -1.75 + 0.25])
    torch.testing.assert_close(probs[0], torch.softmax(logits, 0))


def test_default_target_is_prediction_and_true_label_option():
    model, x = Tiny(), tiny_input()
    maps, target, probs = gradcam(model, x)
    assert target.tolist() == [0] == probs.argmax(1).tolist()
    maps1, target1, _ = gradcam(model, x, target=1)  # e.g. the true label
    assert target1.tolist() == [1]
    assert not torch.allclose(maps, maps1)
    torch.testing.assert_close(maps1[0], torch.outer(U[:, 0], U[:, 0]))


def test_map_that_relu_zeroes_everywhere_gives_zeros_not_nan():
    model = Tiny()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, -1.0]]))  # class 1 map = −2 < 0 everywhere
    maps, _, _ = gradcam(model, tiny_input(), target=1)
    assert torch.equal(maps, torch.zeros(1, 4, 4))


def test_minmax_scale():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 2.0]], [[7.0, 7.0], [7.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = minmax_scale(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.equal(out[1:], torch.zeros(2, 2, 2))
    assert not torch.isnan(out).any()


def test_smallcnn_batch_equals_per_image_and_model_state_restored():
    model = create_model("smallcnn", 3, 32, seed=0)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    maps, target, probs = gradcam(model, x)
    assert maps.shape == (5, 32, 32) and target.shape == (5,) and probs.shape == (5, 3)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert torch.equal(maps.flatten(1).amax(1) > 0, maps.flatten(1).amax(1) == 1.0)  # scaled images reach 1
    singles = [gradcam(model, x[i : i + 1]) for i in range(5)]
    torch.testing.assert_close(maps, torch.cat([s[0] for s in singles]), atol=1e-5, rtol=0)
    assert target.tolist() == [int(s[1]) for s in singles]
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(probs, torch.softmax(model(x), 1))
    model.train()
    maps2, _, _ = gradcam(model, x)  # works again from train mode; state restored each time
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(maps, maps2)


def test_works_under_no_grad_and_with_layer_by_name():
    model = create_model("smallcnn", 2, 32, seed=0, widths=(8, 16, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = gradcam(model, x)[0]
    b = gradcam(model, x, layer="features.block4")[0]
    torch.testing.assert_close(a, b)
    c = gradcam(model, x, layer="features.block3")[0]
    assert c.shape == (2, 32, 32)


def test_refuses_opacus_hooked_model():
    model = create_model("smallcnn", 2, 32, seed=0)
    gsm = GradSampleModule(model)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(
        UserError, match="without active Opacus hooks.*GradSampleModule with hooks enabled.*to_standard_module"
    ):
        gradcam(gsm, x)
    with pytest.raises(UserError, match="enabled Opacus grad-sample hooks"):
        gradcam(model, x)  # the inner model still has the wrapper's hooks attached
    plain = gsm.to_standard_module()
    maps, _, _ = gradcam(plain, x)
    assert maps.shape == (2, 32, 32)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_runs_inside_private_setup_hooks_off(mode):
    model = create_model("smallcnn", 2, 32, seed=0)
    data = TensorDataset(torch.rand(40, 3, 32, 32), torch.randint(0, 2, (40,)))
    setup = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=10),
        scheme="clip-only",
        delta=1e-3,
        max_grad_norm=1.0,
        epochs=1,
        grad_sample_mode=mode,
    )
    x = torch.rand(3, 3, 32, 32)
    with pytest.raises(UserError, match="Opacus"):
        gradcam(setup.plain_module, x)  # hooks enabled
    with setup.hooks_off() as plain:
        plain.train()
        maps, target, _ = gradcam(plain, x)
        assert plain.training  # restored
        assert all(getattr(p, "grad_sample", None) is None for p in plain.parameters())
        with pytest.raises(UserError, match="model randomisation needs the plain model without Opacus hooks"):
            random_init_copy(plain, 0)  # a deepcopy would drag the (disabled) hooks along
    assert setup.module.hooks_enabled
    fresh = create_model("smallcnn", 2, 32, seed=0)
    fresh.load_state_dict(plain.state_dict())
    reference, ref_target, _ = gradcam(fresh, x)
    torch.testing.assert_close(maps, reference)
    assert torch.equal(target, ref_target)


def test_bad_inputs():
    model = Tiny()
    with pytest.raises(
        UserError, match=re.escape("unknown explanation method 'nope'; known: " + ", ".join(names.EXPLAIN_METHODS))
    ):
        gradcam(model, tiny_input(), method="nope")
    with pytest.raises(UserError, match="out of range for a model with 2 classes"):
        gradcam(model, tiny_input(), target=5)
    with pytest.raises(UserError, match="not a submodule"):
        gradcam(model, tiny_input(), layer="nope.layer")
    with torch.inference_mode(), pytest.raises(UserError, match="inference_mode"):
        gradcam(model, tiny_input())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_guided_gradcam_method():
    assert {"gradcam", "guided-gradcam"} <= set(METHODS)
    model = create_model("smallcnn", 3, 32, seed=0, widths=(8, 16, 32, 32))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps, target, probs = gradcam(model, x, method="guided-gradcam")
    assert maps.shape == (3, 32, 32) and float(maps.min()) >= 0 and float(maps.max()) == 1.0
    assert torch.equal(target, gradcam(model, x)[1])
    # Captum's GuidedGradCam for the predicted class, |.| summed over channels, min-max per image
    model.eval()
    ref = GuidedGradCam(model, model.features.block4).attribute(
        x.clone().requires_grad_(), target=target, interpolate_mode="bilinear"
    )
    ref = ref.detach().abs().sum(1)
    lo = ref.flatten(1).amin(1)[:, None, None]
    hi = ref.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(maps, (ref - lo) / (hi - lo))


def test_random_init_copy_deterministic_and_leaves_original():
    model = create_model("smallcnn", 3, 32, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a, b, c = random_init_copy(model, 1), random_init_copy(model, 1), random_init_copy(model, 2)
    assert torch.equal(torch.get_rng_state(), rng)  # caller's RNG untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k])
    conv = "features.block1.0.weight"
    assert not torch.equal(sa[conv], before[conv]) and not torch.equal(sa[conv], sc[conv])
    assert not torch.equal(sa["classifier.weight"], before["classifier.weight"])
    assert torch.equal(sa["normalize.mean"], before["normalize.mean"])
    assert a.gradcam_layer == model.gradcam_layer
    assert gradcam(a, torch.rand(2, 3, 32, 32))[0].shape == (2, 32, 32)
