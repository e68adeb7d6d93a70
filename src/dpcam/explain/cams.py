"""Grad-CAM++ and Score-CAM as Captum layer attributions (Captum has neither; written from their papers).

Both extend Captum through its own base classes, as Captum's ``LayerGradCam`` does: they take the
same ``forward_func`` and ``layer``, return one ``(B, 1, h, w)`` map on the layer's grid (ReLU
applied, as in both papers), to be upsampled with ``LayerAttribution.interpolate`` like Grad-CAM.
The tests check both against hand computations on a tiny model (tests/explain/test_cams.py).

Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential of the class score): with ``g``
the gradient of the class score with respect to the layer's activations ``A`` (per channel k and
position ij),

    α_kij = g² / (2 g² + Σ_ab A_kab · g³)        (0 where g = 0),
    w_k   = Σ_ij α_kij · ReLU(g_kij),             map = ReLU(Σ_k w_k A_k).

Score-CAM (Wang et al. 2020, as its authors' code does it): each channel's activation, bilinearly
upsampled to the input and min–max scaled to [0, 1] (a constant channel gets weight 0), masks the
input; the weight of channel k is the softmax probability of the explained class on ``x ∘ H_k``,
and map = ReLU(Σ_k w_k A_k). No gradient is taken; it costs one forward per channel and image,
batched ``chunk`` images per forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum.attr import LayerActivation
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from torch import Tensor, nn


def _channels(name: str, t: Tensor) -> Tensor:
    if t.dim() != 4:
        raise ValueError(f"{name} needs a layer with one (B, C, h, w) output; got shape {tuple(t.shape)}")
    return t


class LayerGradCamPlusPlus(LayerAttribution, GradientAttribution):
    """Grad-CAM++ of ``layer``: ``attribute(inputs, target)`` → ``(B, 1, h, w)`` (ReLU applied)."""

    def __init__(self, forward_func: Callable[..., Tensor], layer: nn.Module) -> None:
        LayerAttribution.__init__(self, forward_func, layer)
        GradientAttribution.__init__(self, forward_func)

    def attribute(self, inputs: Tensor, target: Tensor | int | None = None) -> Tensor:
        grads, acts = compute_layer_gradients_and_eval(self.forward_func, self.layer, (inputs,), target)
        g = _channels("Grad-CAM++", grads[0]).double()
        a = acts[0].double()
        g2 = g * g
        denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g
        alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        weights = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
        return F.relu((weights * a).sum(dim=1, keepdim=True)).to(acts[0].dtype)


class LayerScoreCam(LayerAttribution):
    """Score-CAM of ``layer``: ``attribute(inputs, target)`` → ``(B, 1, h, w)`` (ReLU applied).

    ``forward_func`` maps images to logits; ``target`` is a ``(B,)`` long tensor of classes.
    """

    def __init__(self, forward_func: Callable[..., Tensor], layer: nn.Module, chunk: int = 512) -> None:
        super().__init__(forward_func, layer)
        self.chunk = int(chunk)

    @torch.no_grad()
    def attribute(self, inputs: Tensor, target: Tensor) -> Tensor:
        acts = _channels("Score-CAM", LayerActivation(self.forward_func, self.layer).attribute(inputs)).detach()
        b, k = acts.shape[:2]
        masks = F.interpolate(acts, size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)
        flat = masks.flatten(2)
        lo, hi = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
        varies = (hi > lo).squeeze(2)  # (B, K): a constant channel masks nothing and gets weight 0
        masks = ((flat - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).reshape(masks.shape)
        masked = (inputs[:, None] * masks[:, :, None]).flatten(0, 1)  # (B·K, C, H, W), image-major
        classes = target.repeat_interleave(k)
        scores = torch.cat(
            [
                torch.softmax(self.forward_func(masked[i : i + self.chunk]).float(), dim=1)
                .gather(1, classes[i : i + self.chunk, None])
                .squeeze(1)
                for i in range(0, masked.shape[0], self.chunk)
            ]
        ).reshape(b, k)
        weights = torch.where(varies, scores, torch.zeros_like(scores)).to(acts.dtype)
        return F.relu((weights[:, :, None, None] * acts).sum(dim=1, keepdim=True))
