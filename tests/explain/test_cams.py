"""Grad-CAM++ and Score-CAM: hand computations on the tiny model whose activations and head are known."""

import torch

from dpcam.explain.cams import LayerGradCamPlusPlus, LayerScoreCam
from dpcam.explain.gradcam import gradcam
from dpcam.models import create_model
from tests.explain.toys import Tiny, U, tiny_input

M = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # the tiny model's block means: A0 = M, A1 = 2 − M (sums 7 and 1)


def _logit(model, c):
    return lambda inp: model(inp)[:, c]


def test_gradcam_plus_plus_matches_hand_computation():
    model, x = Tiny().eval(), tiny_input()
    # g_k = W[c, k] / 4 everywhere; α_k = g² / (2g² + S_k g³) = 1 / (2 + S_k g_k); w_k = 4 · ReLU(g_k) · α_k
    # class 0, W = (1, 0.5): g = (0.25, 0.125); w0 = 1 / 3.75, w1 = 0.5 / 2.125
    got0 = LayerGradCamPlusPlus(_logit(model, 0), model.conv).attribute(x)
    torch.testing.assert_close(got0[0, 0], (1 / 3.75) * M + (0.5 / 2.125) * (2 - M))
    # class 1, W = (−1, 1): ReLU(g0) = 0 so w0 = 0; g1 = 0.25, w1 = 1 / 2.25; map = ReLU(w1 (2 − M))
    got1 = LayerGradCamPlusPlus(_logit(model, 1), model.conv).attribute(x)
    torch.testing.assert_close(got1[0, 0], (1 / 2.25) * (2 - M).clamp_min(0))
    # through gradcam(): upsampled and min–max scaled; class 1 keeps the (0, 1) block that Grad-CAM drops
    maps, _, _ = gradcam(model, x.repeat(2, 1, 1, 1), target=torch.tensor([0, 1]), method="gradcam++")
    up = U @ (2 - M).clamp_min(0) @ U.T
    torch.testing.assert_close(maps[1], (up - up.min()) / (up.max() - up.min()))
    assert float(maps[1][0, 3]) > 0 == float(gradcam(model, x, target=1)[0][0, 0, 3])


def test_scorecam_matches_hand_computation():
    model, x = Tiny().eval(), tiny_input()
    # masks: each channel upsampled and min–max scaled; H1 = 1 − H0 because A1 = 2 − A0
    h0 = U @ M @ U.T
    h0 = (h0 - h0.min()) / (h0.max() - h0.min())
    w = torch.tensor([[1.0, 0.5], [-1.0, 1.0]])
    for c in (0, 1):
        weights = []
        for h in (h0, 1 - h0):
            m = float((x[0, 0] * h).mean())  # the conv's block means average to the image mean: A = (m, 2 − m)
            p = torch.softmax(w @ torch.tensor([m, 2 - m]), 0)[c]
            weights.append(float(p))
        expected = (weights[0] * M + weights[1] * (2 - M)).clamp_min(0)
        got = LayerScoreCam(model, model.conv).attribute(x, torch.tensor([c]))
        torch.testing.assert_close(got[0, 0], expected)


def test_scorecam_constant_channel_weighs_nothing_and_chunks_agree():
    model = create_model("smallcnn", 3, 32, seed=0, widths=(8, 16, 32, 32)).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = model(x).argmax(1)
    layer = model.features.block4
    torch.testing.assert_close(
        LayerScoreCam(model, layer, chunk=7).attribute(x, t), LayerScoreCam(model, layer).attribute(x, t)
    )
    flat = Tiny().eval()
    with torch.no_grad():
        flat.conv.weight.zero_()  # both channels constant (0 and 2): no mask, no weight, an all-zero map
    assert float(LayerScoreCam(flat, flat.conv).attribute(tiny_input(), torch.tensor([0])).abs().max()) == 0.0


def test_cam_batches_equal_single_images():
    model = create_model("smallcnn", 3, 32, seed=0, widths=(8, 16, 32, 32))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for method in ("gradcam++", "scorecam"):
        maps, target, _ = gradcam(model, x, method=method)
        one = torch.cat([gradcam(model, x[i : i + 1], method=method)[0] for i in range(4)])
        torch.testing.assert_close(maps, one, atol=1e-5, rtol=1e-4)
        assert maps.shape == (4, 32, 32) and float(maps.amax(dim=(1, 2)).min()) == 1.0
