"""Batched Grad-CAM maps through Captum, on the plain model (docs/metrics.md, "Grad-CAM map").

:func:`gradcam` turns a pixel-space batch ``x`` of shape ``(B, C, H, W)`` (float in [0, 1], the
input dpcam models take) into

- ``maps``: float32 ``(B, H, W)`` in [0, 1] — Captum ``LayerGradCam`` on the model's registered
  target layer with ``relu_attributions=True``, bilinearly upsampled to ``(H, W)`` with
  ``LayerAttribution.interpolate``, then min–max scaled per image (a constant map, e.g. one
  that ReLU zeroed everywhere, becomes all zeros, never NaN);
- ``target``: long ``(B,)`` — the class explained: the model's prediction on ``x`` by default,
  or the classes given (e.g. the true labels);
- ``probs``: float32 ``(B, num_classes)`` — softmax of the logits of the same forward pass, so
  Y = ``probs[i, target[i]]`` for the metrics needs no second pass over ``x``.

Everything is batched: one forward (and one backward through the layers after the target layer)
per call; no per-image Python loop.

Cost: only the gradient with respect to the target layer is taken, so backpropagation runs
through the head only (measured on CPU, smallcnn at 64 px: maps ≈ 1.1–1.4× a plain forward).
While the maps are computed the model's parameters are temporarily frozen
(``requires_grad=False``, restored afterwards), so autograd records nothing before the target
layer and the trunk's activations are not kept (memory, not time). The map is the same as with
trainable parameters (Grad-CAM needs no parameter gradient); the model is put in eval mode for
the call and its train/eval flags restored. Do not call it while another thread trains the
same model object.

Opacus: Grad-CAM never runs while Opacus hooks are active. A model with **enabled** Opacus
grad-sample hooks (a ``GradSampleModule`` or other Opacus wrapper, or a plain module whose
submodules carry the hooks of an enabled wrapper) is **refused** with a
:class:`~dpcam.errors.UserError` rather than silently copied: a ``deepcopy`` would copy the hook
handles (whose ``remove()`` acts on the original) and the wrapper they are bound to. Allowed:
a plain module, or one whose Opacus hooks are disabled — ``with setup.hooks_off() as plain:``
(:class:`dpcam.privacy.setup.PrivateSetup`) or after Opacus' ``disable_hooks()`` — since
disabled hooks return at once in eval mode; leftover ``_forward_counter`` attributes (after
``remove_hooks()`` without ``cleanup()``) are harmless. Or unwrap with Opacus'
``GradSampleModule.to_standard_module()``, or rebuild the model with
``dpcam.models.create_model`` and load the checkpoint. See :func:`opacus_state`.

Methods: ``method=`` any name in :data:`dpcam.explain.methods.METHODS` (Grad-CAM, Grad-CAM++,
Score-CAM, guided Grad-CAM, Integrated Gradients, occlusion; that module says what each computes
and costs), with its settings in ``options``; every method's raw map is min–max scaled here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.explain.methods import METHODS
from dpcam.models import target_layer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- helpers


class _NoOpacus:
    """Stands for Opacus' classes when Opacus was never imported: nothing is an instance of it."""


def _opacus_classes() -> tuple[type, type]:
    # Opacus objects exist only once opacus is imported; importing it just to look costs ~2 s
    # in every explain and audit process
    if "opacus" not in sys.modules:
        return _NoOpacus, _NoOpacus
    from opacus.grad_sample.gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule

    return AbstractGradSampleHooks, AbstractGradSampleModule


def _hook_owner(hook) -> object | None:
    """The object a registered hook is bound to (a bound method or a functools.partial of one)."""
    owner = getattr(hook, "__self__", None)
    if owner is None:
        owner = getattr(getattr(hook, "func", None), "__self__", None)
    return owner


def opacus_state(model: nn.Module, *, active_only: bool = True) -> str | None:
    """Why ``model`` is not a plain model for Opacus' sake, or None.

    ``active_only=True`` (what :func:`gradcam` checks): an Opacus ``AbstractGradSampleModule``
    wrapper among ``model.modules()`` whose hooks are enabled (a wrapper without an on/off
    switch, e.g. expanded weights, counts as enabled), or Opacus grad-sample hooks registered on
    a submodule by an owner whose hooks are enabled. Hooks that are registered but disabled
    (dpcam's ``PrivateSetup.hooks_off()``, Opacus' ``disable_hooks()``) return at once outside
    training mode and are allowed. ``active_only=False``: any Opacus wrapper, registered hook,
    ``autograd_grad_sample_hooks`` list or parameter with ``_forward_counter``/``grad_sample``.
    """
    hooks_cls, module_cls = _opacus_classes()

    def on(obj) -> bool:
        return not active_only or bool(getattr(obj, "hooks_enabled", True))

    for m in model.modules():
        if isinstance(m, module_cls) and on(m):
            return f"it is (or contains) an Opacus {type(m).__name__}" + (" with hooks enabled" if active_only else "")
    for name, m in model.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values()]
        for hook in hooks:
            owner = _hook_owner(hook)
            if isinstance(owner, hooks_cls) and on(owner):
                state = "enabled " if active_only else ""
                return (
                    f"module {name or type(m).__name__!r} has {state}Opacus grad-sample hooks ({type(owner).__name__})"
                )
    if not active_only:
        for m in model.modules():
            if hasattr(m, "autograd_grad_sample_hooks"):
                return f"{type(m).__name__} holds Opacus autograd_grad_sample_hooks"
        for name, p in model.named_parameters():
            if hasattr(p, "_forward_counter") or hasattr(p, "grad_sample"):
                return f"parameter {name!r} carries Opacus grad-sample attributes"
    return None


def check_plain(model: nn.Module, what: str = "Grad-CAM", *, active_only: bool = True) -> None:
    """Raise UserError when :func:`opacus_state` finds Opacus grad-sample state on ``model``."""
    state = opacus_state(model, active_only=active_only)
    if state is not None:
        raise UserError(
            f"{what} needs the plain model without {'active ' if active_only else ''}Opacus hooks, but {state}; "
            "run it inside dpcam's PrivateSetup.hooks_off(), unwrap with GradSampleModule.to_standard_module() "
            "(Opacus), or rebuild the model with dpcam.models.create_model and load the checkpoint"
        )


@contextlib.contextmanager
def evaluating(model: nn.Module, *, freeze: bool = False) -> Iterator[nn.Module]:
    """Context: ``model`` in eval mode (and, with ``freeze``, parameters not requiring grad); restored after.

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` are put back as
    they were, even on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min–max scaling to [0, 1] of ``maps`` ``(B, ...)``; same shape, float32.

    Each image ``m`` becomes ``(m - min m) / (max m - min m)``; an image whose maximum equals its
    minimum (a constant map, e.g. all zeros after the ReLU) becomes all zeros, never NaN.
    """
    flat = maps.detach().float().flatten(1)
    lo, hi = flat.aminmax(dim=1)
    rng = (hi - lo)[:, None]
    ok = rng > 0
    scaled = (flat - lo[:, None]) / torch.where(ok, rng, torch.ones_like(rng))
    scaled = torch.where(ok, scaled.clamp_(0.0, 1.0), torch.zeros_like(scaled))
    return scaled.reshape(maps.shape)


def _as_target(target, batch: int, device: torch.device) -> torch.Tensor | None:
    """None, an int, a sequence or a tensor of classes → long ``(B,)`` on ``device`` (or None)."""
    if target is None:
        return None
    t = torch.as_tensor(target, device=device).long().reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"target has {t.numel()} entries for a batch of {batch} images")
    if t.numel() and int(t.min()) < 0:
        raise UserError(f"explained class {int(t.min())} is negative; classes are 0 .. num_classes-1")
    return t.contiguous()


def resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if layer is None:
        return target_layer(model)
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and len(list(m.children())) == 0][-6:]
        raise UserError(
            f"Grad-CAM layer {layer!r} is not a submodule of {type(model).__name__}; "
            f"give a dotted module name such as {', '.join(names) or 'features.0'}"
        ) from None


# ---------------------------------------------------------------------------------- public API


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | Sequence[int] | int | None = None,
    layer: nn.Module | str | None = None,
    method: str = "gradcam",
    options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explanation maps of a batch: ``(maps, target, probs)``.

    Args:
        model: a plain module (no Opacus hooks; see module doc) mapping pixel-space float
            ``(B, C, H, W)`` to logits ``(B, num_classes)``, on ``x``'s device. It runs in eval
            mode with frozen parameters for the call; both are restored afterwards.
        x: float ``(B, C, H, W)`` pixel-space images (dpcam models normalise internally).
        target: class explained per image: None → the model's prediction on ``x``; an int (all
            images), a sequence or a ``(B,)`` tensor (e.g. the true labels).
        layer: the Grad-CAM layer: None → the model's registered ``gradcam_layer``
            (:func:`dpcam.models.target_layer`), or a module, or a dotted submodule name.
        method: a name in :data:`~dpcam.explain.methods.METHODS` (``gradcam`` is the map of docs/metrics.md).
        options: the method's keyword settings (:func:`dpcam.explain.methods.options_of`).

    Returns:
        maps: float32 ``(B, H, W)`` in [0, 1], per-image min–max scaled (constant → zeros).
        target: long ``(B,)``, the classes explained.
        probs: float32 ``(B, num_classes)``, softmax of the logits on ``x`` (same forward pass as
            the map for ``gradcam``), detached.

    Raises:
        UserError: unknown method, unknown layer name, active Opacus hooks on the model, a target
            class outside the model's classes, or a call inside ``torch.inference_mode``.
    """
    explain_method = METHODS.lookup(str(method).lower())
    if x.dim() != 4:
        raise ValueError(f"gradcam expects images of shape (B, C, H, W); got {tuple(x.shape)}")
    if torch.is_inference_mode_enabled():
        raise UserError(
            "Grad-CAM needs gradients but was called inside torch.inference_mode(); "
            "call it outside (torch.no_grad is fine)"
        )
    check_plain(model)
    layer_module = resolve_layer(model, layer)
    t = _as_target(target, x.shape[0], x.device)
    inp = x.detach()
    if not inp.is_floating_point():
        inp = inp.float()
    with evaluating(model, freeze=True), torch.enable_grad():
        raw, logits, t = explain_method(model, layer_module, inp, t, **dict(options or {}))
    maps = minmax_scale(raw)
    probs = torch.softmax(logits.float(), dim=1)
    return maps, t.long(), probs


def random_init_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with re-initialised weights (Adebayo et al. 2018 model randomisation).

    A ``deepcopy`` of ``model`` on which every submodule with a ``reset_parameters()`` method
    (Conv, Linear, GroupNorm, ...) is reset, drawing from a generator seeded with ``seed``
    inside ``torch.random.fork_rng`` (the caller's CPU and CUDA RNG states are untouched).
    Buffers without a reset (e.g. dpcam's ``Normalize`` mean/std) are kept. The original model
    is not modified. Deterministic for a given seed, architecture and device.
    Refuses (UserError) a model with any Opacus state, even disabled hooks, which a deepcopy
    would drag along (``opacus_state(model, active_only=False)``). Note that
    ``reset_parameters`` uses PyTorch's default initialisers, which may differ from the ones the
    builder used (smallcnn's Kaiming-normal convs); any random init serves the check.
    Parameters owned directly by a module without ``reset_parameters`` keep their trained
    values; they are named in a warning.
    """
    check_plain(model, what="model randomisation", active_only=False)
    clone = copy.deepcopy(model)
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    untouched: list[str] = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        for name, m in clone.named_modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                untouched += [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
    if untouched:
        log.warning(
            "random_init_copy: %d parameters have no reset_parameters() and keep their trained values: %s",
            len(untouched),
            ", ".join(untouched[:6]),
        )
    return clone
