"""Toy models and scenes with known answers, shared by the tests of the explanation-metric families."""

import torch
from torch import nn


class ProbModel(nn.Module):
    """Two classes with p(class 1 | x) = f(x) exactly: logits = log([1 − f, f])."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.dummy = nn.Parameter(torch.zeros(()))  # so eval()/parameters() behave like a model

    def forward(self, x):
        p = self.f(x).clamp(0.0, 1.0)
        return torch.log(torch.stack([1 - p, p], dim=1).clamp_min(1e-12)) + 0 * self.dummy


def brightness(x):
    return x.mean(dim=(1, 2, 3))


REGION = (slice(4, 12), slice(4, 12))  # the toy model's evidence: an 8×8 square
ELSEWHERE = (slice(20, 28), slice(18, 26))


def region_model():
    """p(class 1 | x) = the mean brightness of REGION: the evidence is exactly there."""
    return ProbModel(lambda x: x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)))


def bump(where, size=32):
    m = torch.zeros(size, size)
    m[where] = 1.0
    return torch.nn.functional.avg_pool2d(m[None, None], 5, 1, 2)[0, 0]  # a smooth bump, zeros far away


def scene(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.05 * torch.rand(b, 3, 32, 32, generator=g)  # dark, textured background
    x[:, :, REGION[0], REGION[1]] = 0.85 + 0.1 * torch.rand(b, 3, 8, 8, generator=g)  # the bright evidence
    return x


# Bilinear 2 -> 4 upsampling (align_corners=False) as a matrix: out = U @ a @ U.T
U = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


class Tiny(nn.Module):
    """1-channel 4x4 input → conv 2x2 stride 2 (2 channels: M and 2 − M, M = block means) → GAP → linear.

    With block means M, the layer activations are A0 = M, A1 = 2 − M; the head is
    logit_c = Σ_k W[c, k] · mean(A_k), so Grad-CAM's weights are α_ck = W[c, k] / 4 and the
    (pre-ReLU) map of class c is Σ_k W[c, k] A_k / 4.
    """

    gradcam_layer = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=2, stride=2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), -0.25)]))
            self.conv.bias.copy_(torch.tensor([0.0, 2.0]))
            self.head.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def tiny_input() -> torch.Tensor:
    m = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # block means
    return m.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]  # (1, 1, 4, 4)
