"""Building blocks shared by dpcam's models (:mod:`dpcam.models`, :mod:`dpcam.tvmodels`).

Every model takes pixel-space input in [0, 1] and normalises it itself (:class:`Normalize`), uses
GroupNorm instead of BatchNorm (per-example gradients need no batch statistics) and no in-place
activations (Opacus's hooks need the activations they saw). Pretrained BatchNorm weights (torchvision's
ImageNet state dicts) become :class:`FrozenBatchNorm2d` layers: fixed statistics, no batch statistics ever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dpcam.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel with fixed buffers (no parameters, so Opacus ignores it).

    Input and output: float ``(B, C, H, W)``; ``mean``/``std`` have C entries. The buffers are
    persistent (saved in the state dict) so a model trained with other statistics reloads them.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not mean:
            raise UserError(f"normalisation mean {mean} and std {std}: give one value of each per channel")
        if min(std) <= 0:
            raise UserError(f"normalisation std {std} must be > 0 for every channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over ``num_channels`` with gcd(num_channels, max_groups) groups (always divides C)."""
    return nn.GroupNorm(math.gcd(num_channels, max_groups), num_channels)


def out_of_place(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every module that has the flag (ReLU, Dropout, ...); returns ``model``."""
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return model


# ------------------------------------------------------------------------------ frozen BatchNorm

BATCHNORM_EPS = 1e-5  # torchvision's BatchNorm2d default (a state dict does not store eps)
_STATISTICS = ("running_mean", "running_var")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics: ``(x − running_mean) / √(running_var + eps) · weight + bias`` per channel.

    What a pretrained BatchNorm layer (torchvision's ImageNet weights) becomes in a dpcam model: the
    statistics are the file's, fixed for good (never a batch statistic, in training mode too), so each
    example's output depends on that example only and per-example gradients are those of a per-channel
    affine map. ``weight``/``bias`` are parameters: frozen with the trunk (``models.freeze``) they are
    constants like torchvision's ``FrozenBatchNorm2d``, whose affine is a buffer; trained (``trainable: all``)
    they get exact per-example gradients (:func:`_frozen_batchnorm_grad_sample`), clipped and noised by
    Opacus with every other trained parameter.

    ``running_mean``/``running_var`` are constants of the layer but not buffers: Opacus refuses a trainable
    layer with buffers (its guard against BatchNorm's running statistics, which would be updated from the
    private data; these never are). They are saved and loaded under BatchNorm's names (a torchvision state
    dict loads as is; its ``num_batches_tracked`` step counter is ignored) and follow ``.to()``/``.cuda()``.
    Input and output: float ``(B, C, H, W)``.
    """

    def __init__(self, num_features: int, eps: float = BATCHNORM_EPS) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.running_mean = torch.zeros(self.num_features)  # plain tensors: see the class docstring
        self.running_var = torch.ones(self.num_features)
        _register_grad_sampler()

    def scale(self) -> torch.Tensor:
        """1 / √(running_var + eps), per channel."""
        return torch.rsqrt(self.running_var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.weight).__name__ == "ExpandedWeight":  # torch's expanded weights have no per-channel product
            raise UserError(
                "grad_sample_mode ew cannot train a frozen BatchNorm layer's affine (trainable all from a BatchNorm "
                "weights file): use grad_sample_mode hooks, functorch or ghost"
            )
        scale = self.weight * self.scale()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def reset_parameters(self) -> None:
        """BatchNorm's reset: identity statistics and affine."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double() ... move the statistics too
        super()._apply(fn, recurse)
        for name in _STATISTICS:
            moved = fn(getattr(self, name))
            if not moved.is_meta:  # Opacus's functorch mode calls a copy moved to "meta" with real parameters only
                setattr(self, name, moved)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _STATISTICS:
            value = getattr(self, name)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm's step counter: nothing to run here
        for name in _STATISTICS:
            key, current = prefix + name, getattr(self, name)
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if tuple(value.shape) != tuple(current.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(current.shape)}."
                )
                continue
            with torch.no_grad():
                current.copy_(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _frozen_batchnorm_grad_sample(
    layer: FrozenBatchNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler: per-example gradients of the affine, Σ_hw (g · x̂) for weight and Σ_hw g for bias."""
    out = {}
    if layer.weight.requires_grad:
        x = activations[0]
        normed = (x - layer.running_mean.reshape(1, -1, 1, 1)) * layer.scale().reshape(1, -1, 1, 1)
        out[layer.weight] = torch.einsum("nc...->nc", normed * backprops)
    if layer.bias.requires_grad:
        out[layer.bias] = torch.einsum("nc...->nc", backprops)
    return out


_REGISTERED: list[bool] = []


def _register_grad_sampler() -> None:
    """Register :func:`_frozen_batchnorm_grad_sample` with Opacus, once, when the first layer is built (importing
    Opacus costs about 2 s: processes whose models hold no BatchNorm weights never pay; without the
    registration Opacus would fall back to its slower functorch per-sample gradients)."""
    if _REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(FrozenBatchNorm2d)(_frozen_batchnorm_grad_sample)
    _REGISTERED.append(True)


def batchnorm_layers(keys: Iterable[str]) -> list[str]:
    """The layers a state dict holds BatchNorm statistics for (the prefixes of its ``*.running_mean`` keys)."""
    return sorted({k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean")})


def freeze_batchnorm_into(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Replace each named GroupNorm of ``model`` by a :class:`FrozenBatchNorm2d` of its width, on its device,
    keeping its ``requires_grad``; names that are not a GroupNorm of ``model`` are left alone.

    Returns ``{name: the GroupNorm replaced}`` (:func:`restore_layers` puts them back). The new layers hold
    identity statistics and affine until a state dict is loaded into them.
    """
    replaced: dict[str, nn.Module] = {}
    for name in names:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(old, nn.GroupNorm) or not name:
            continue
        new = FrozenBatchNorm2d(old.num_channels).to(device=old.weight.device, dtype=old.weight.dtype)
        for p in new.parameters():
            p.requires_grad_(old.weight.requires_grad)
        _set_submodule(model, name, new)
        replaced[name] = old
    return replaced


def restore_layers(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo :func:`freeze_batchnorm_into`."""
    for name, old in replaced.items():
        _set_submodule(model, name, old)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class AdoptsBatchNorm(nn.Module):
    """Mixin (first base) for a model whose GroupNorm layers may hold pretrained BatchNorm weights frozen.

    ``load_state_dict`` first turns every GroupNorm for which the state dict holds BatchNorm statistics
    (``<layer>.running_mean``) into a :class:`FrozenBatchNorm2d`: a saved fine-tuned model (model.pt) says by
    its own keys which of its layers are frozen BatchNorm, so ``dpcam.saved.load_model`` rebuilds it from
    model.json as it does any model.
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        freeze_batchnorm_into(self, batchnorm_layers(state_dict))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
