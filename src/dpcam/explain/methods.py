"""The explanation methods (``METHODS``): each turns a batch into raw maps the metrics accept.

Registered with ``@METHODS.register(name)``. A method is called as
``fn(model, layer, x, target, **options)`` with the model in eval mode with frozen parameters
and checked free of active Opacus hooks, ``x`` float ``(B, C, H, W)`` pixel-space images,
``target`` long ``(B,)`` or None (= explain the prediction), under ``torch.enable_grad()``. It
returns unscaled non-negative maps ``(B, H, W)``, the detached logits ``(B, num_classes)`` of
``x`` and the classes explained ``(B,)``; :func:`dpcam.explain.gradcam.gradcam` does the
per-image min–max scaling. ``options`` are the method's settings from ``explain``
(:func:`options_of`). Definitions and costs: docs/metrics.md, "Explanation methods".

CAM methods (a map on the model's Grad-CAM layer, bilinearly upsampled to the image):

``gradcam``        Captum ``LayerGradCam`` (ReLU on); one forward pass.
``gradcam++``      Grad-CAM++ (:mod:`dpcam.explain.cams`); one forward and a backward to the layer.
``scorecam``       Score-CAM (:mod:`dpcam.explain.cams`); one forward per channel of the layer.

Pixel attributions (reduced to a map by the absolute value summed over channels):

``guided-gradcam``       Captum ``GuidedGradCam`` (guided backpropagation × the upsampled Grad-CAM map).
``integrated-gradients`` Captum ``IntegratedGradients`` of the explained logit from the blurred image
                         (the deletion/insertion baseline, :func:`~dpcam.explain.blur.blur_baseline`)
                         to ``x``, ``ig_steps`` Gauss–Legendre steps.
``occlusion``            Captum ``Occlusion``: the drop of the explained logit when a square window of
                         ``occlusion_window`` pixels (all channels) becomes the blurred image, sliding by
                         ``occlusion_stride`` pixels, averaged over the windows that cover a pixel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import GuidedGradCam, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
from torch import nn

from dpcam.errors import UserError
from dpcam.explain.blur import blur_baseline
from dpcam.explain.cams import LayerGradCamPlusPlus, LayerScoreCam
from dpcam.registry import Registry

# (model, layer, x (B,C,H,W), target (B,) long or None, **options) ->
#   (raw maps (B,H,W) float, unscaled; logits (B,num_classes) detached; target (B,) long)
Method = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
METHODS: Registry[Method] = Registry("explanation method")

# The explain keys each method reads, as its keyword names (options_of).
OPTIONS: dict[str, dict[str, str]] = {
    "integrated-gradients": {"ig_steps": "steps"},
    "occlusion": {"occlusion_window": "window", "occlusion_stride": "stride"},
}


def options_of(method: str, explain: Any) -> dict[str, Any]:
    """The keyword options of ``method`` read from an explain config (any object with the attributes)."""
    return {kw: getattr(explain, key) for key, kw in OPTIONS.get(method, {}).items()}


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    if target.numel() and int(target.max()) >= num_classes:
        raise UserError(
            f"explained class {int(target.max())} is out of range for a model with {num_classes} classes; "
            "check that the dataset's labels match the model"
        )


def _predicted(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A no-grad forward: the logits of ``x`` and the classes to explain (the prediction when ``target`` is None)."""
    with torch.no_grad():
        logits = model(x).detach()
    t = logits.argmax(dim=1) if target is None else target
    check_target_range(t, logits.shape[1])
    return logits, t


def _upsampled(attr: torch.Tensor, x: torch.Tensor, layer: nn.Module, what: str) -> torch.Tensor:
    if not isinstance(attr, torch.Tensor) or attr.dim() != 4:
        raise UserError(
            f"{what} layer {type(layer).__name__} must output one (B, C, h, w) feature map; "
            "choose a convolutional layer (explain.layer or model.gradcam_layer)"
        )
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _explained_logit(model: nn.Module, target: torch.Tensor | None, seen: dict[str, torch.Tensor]):
    """A forward returning the explained logit per image; the class can be this very pass's prediction."""

    def forward(inp: torch.Tensor) -> torch.Tensor:
        logits = model(inp)
        seen["logits"] = logits.detach()
        t = logits.detach().argmax(dim=1) if target is None else target
        check_target_range(t, logits.shape[1])
        seen["target"] = t
        return logits.gather(1, t[:, None]).squeeze(1)

    return forward


# ----------------------------------------------------------------------------------- CAM methods


@METHODS.register("gradcam")
def _gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None):
    """Captum LayerGradCam (ReLU on) bilinearly upsampled to ``x``'s size; one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    attr = LayerGradCam(_explained_logit(model, target, seen), layer).attribute(x, relu_attributions=True)
    return _upsampled(attr, x, layer, "Grad-CAM"), seen["logits"], seen["target"]


@METHODS.register("gradcam++")
def _gradcam_plus_plus(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None):
    """Grad-CAM++ bilinearly upsampled; one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    attr = LayerGradCamPlusPlus(_explained_logit(model, target, seen), layer).attribute(x)
    return _upsampled(attr, x, layer, "Grad-CAM++"), seen["logits"], seen["target"]


@METHODS.register("scorecam")
def _scorecam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None):
    """Score-CAM bilinearly upsampled; a no-grad forward fixes the class first."""
    logits, t = _predicted(model, x, target)
    attr = LayerScoreCam(model, layer).attribute(x, t)
    return _upsampled(attr, x, layer, "Score-CAM"), logits, t


# ------------------------------------------------------------------------------ pixel attributions


@METHODS.register("guided-gradcam")
def _guided_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None):
    """Captum GuidedGradCam (bilinear), |·| summed over channels; a no-grad forward fixes the class first."""
    logits, t = _predicted(model, x, target)
    with warnings.catch_warnings():  # Captum announces the temporary ReLU backward hooks it sets
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU", category=UserWarning)
        inp = x.detach().clone().requires_grad_(True)
        attr = GuidedGradCam(model, layer).attribute(inp, target=t, interpolate_mode="bilinear")
    return attr.detach().abs().sum(dim=1), logits, t


@METHODS.register("integrated-gradients")
def _integrated_gradients(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, steps: int = 32
):
    """Captum IntegratedGradients from the blurred image, |·| summed over channels."""
    logits, t = _predicted(model, x, target)
    inp = x.detach().clone().requires_grad_(True)
    attr = IntegratedGradients(model).attribute(
        inp, baselines=blur_baseline(x.detach()), target=t, n_steps=int(steps), internal_batch_size=x.shape[0]
    )
    return attr.detach().abs().sum(dim=1), logits, t


@METHODS.register("occlusion")
def _occlusion(
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    window: int = 8,
    stride: int = 4,
):
    """Captum Occlusion to the blurred image, |·| summed over channels."""
    logits, t = _predicted(model, x, target)
    c, h, w = x.shape[1:]
    if window > min(h, w):
        raise UserError(f"explain.occlusion_window = {window} is larger than the {h}×{w} image; choose ≤ {min(h, w)}")
    with torch.no_grad():
        attr = Occlusion(model).attribute(
            x.detach(),
            sliding_window_shapes=(c, int(window), int(window)),
            strides=(c, int(stride), int(stride)),
            baselines=blur_baseline(x.detach()),
            target=t,
            perturbations_per_eval=8,
        )
    return attr.detach().abs().sum(dim=1), logits, t
