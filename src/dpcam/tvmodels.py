"""The paper's torchvision architectures, made Opacus-safe (see :mod:`dpcam.models` for the departures).

A module of its own because importing torchvision's model zoo costs about 2 s: the registered
builders in :mod:`dpcam.models` import it only when a resnet18, alexnet or vgg16 is asked for,
so processes that train or explain the CPU default (smallcnn) never pay for it.

torchvision's ImageNet state dicts load into these models (:func:`dpcam.weights.load_weights`):
``resnet18`` turns the GroupNorm layers the file holds BatchNorm weights for into frozen BatchNorm
(:class:`~dpcam.layers.FrozenBatchNorm2d`, :class:`~dpcam.layers.AdoptsBatchNorm`); ``vgg16`` (torchvision's
configuration D without BatchNorm) takes ``vgg16`` state dicts as they are and ``vgg16_bn`` ones with each
BatchNorm folded into the conv before it (:meth:`VGG16.translate_state_dict`); ``alexnet`` has no BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG as _TVVGG
from torchvision.models import AlexNet as _TVAlexNet
from torchvision.models import ResNet as _TVResNet
from torchvision.models.resnet import BasicBlock as _TVBasicBlock
from torchvision.models.vgg import cfgs as _vgg_cfgs
from torchvision.models.vgg import make_layers as _vgg_make_layers

from dpcam.layers import (
    BATCHNORM_EPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdoptsBatchNorm,
    Normalize,
    group_norm,
    out_of_place,
)

# --------------------------------------------------------------------------------------- resnet18


class _BasicBlock(_TVBasicBlock):
    """torchvision's BasicBlock with out-of-place ReLU and residual sum (Opacus hooks / ew safe)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(AdoptsBatchNorm, _TVResNet):
    """torchvision ResNet-18 with GroupNorm, out-of-place blocks, pixel-space input.

    ``small_input``: 3×3 stride-1 stem and no stem max-pool (``layer4`` at H/8 instead of H/32).
    State-dict keys are torchvision's (plus ``normalize.*``), so ImageNet weights map by name; a layer
    whose BatchNorm weights are loaded becomes a :class:`~dpcam.layers.FrozenBatchNorm2d` (same name, same
    parameter shapes), so the Grad-CAM layer and the head/last-block names stay.
    """

    gradcam_layer = "layer4"
    finetune_layers = {"head": ("fc",), "last-block": ("layer4", "fc")}

    def __init__(self, num_classes: int, small_input: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(_BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=group_norm)
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.small_input = bool(small_input)
        self.normalize = Normalize(mean, std)
        out_of_place(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        return super().forward(self.normalize(x))


# ---------------------------------------------------------------------------------------- alexnet


class AlexNet(_TVAlexNet):
    """torchvision AlexNet with out-of-place ReLUs and pixel-space input; target ``features.11``.

    ``small_input``: conv1 stride 2 / padding 5 (kernel still 11×11) and max-pools with padding 1:
    64 px → target 8×8 (torchvision: 3×3, and 1×1 after the last pool).
    """

    gradcam_layer = "features.11"
    finetune_layers = {"head": ("classifier.6",), "last-block": ("features.10", "classifier")}

    def __init__(self, num_classes: int, small_input: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(num_classes=num_classes)
        if small_input:
            conv1 = self.features[0]
            conv1.stride, conv1.padding = (2, 2), (5, 5)
            for i in (2, 5, 12):
                self.features[i].padding = 1
        self.small_input = bool(small_input)
        self.normalize = Normalize(mean, std)
        out_of_place(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        return super().forward(self.normalize(x))


# ------------------------------------------------------------------------------------------ vgg16


class VGG16(_TVVGG):
    """torchvision VGG-16 (configuration D, no BatchNorm: torchvision's ``vgg16``), out-of-place ReLUs,
    pixel-space input.

    Target ``features.29`` (the last conv ReLU). ``small_input``: the fourth max-pool
    (``features.23``) is an identity, so the last conv block is H/8 wide (8×8 at 64 px).
    A ``vgg16_bn`` state dict loads with each BatchNorm folded into its conv (:meth:`translate_state_dict`).
    """

    gradcam_layer = "features.29"
    finetune_layers = {
        "head": ("classifier.6",),
        "last-block": ("features.24", "features.26", "features.28", "classifier"),
    }

    def __init__(self, num_classes: int, small_input: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(_vgg_make_layers(_vgg_cfgs["D"], batch_norm=False), num_classes=num_classes)
        if small_input:
            self.features[23] = nn.Identity()
        self.small_input = bool(small_input)
        self.normalize = Normalize(mean, std)
        out_of_place(self)

    def translate_state_dict(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]] | None:
        """A torchvision ``vgg16_bn`` state dict in this model's (``vgg16``) layout, or None for any other.

        Each BatchNorm, in eval mode an affine map per channel, is folded into the conv before it:
        ``W' = W · s``, ``b' = (b − running_mean) · s + bias_bn`` with ``s = weight_bn / √(running_var + eps)``
        (computed in float64), so the model computes what ``vgg16_bn`` computes in eval mode, with this
        model's module names (Grad-CAM layer, head, last block) and saved format. Returns the new state dict
        and, per new key, the file keys it was made from. The file's 13 convs (``features.0, 3, 7, ...``) map
        in order onto this model's (``features.0, 2, 5, ...``); the classifier keys are the same.
        """
        bn = sorted(int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".running_mean"))
        convs = sorted(
            int(k.split(".")[1])
            for k, v in state.items()
            if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4
        )
        here = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        if not bn or len(convs) != len(here) or [c + 1 for c in convs] != bn:
            return None
        out: dict[str, torch.Tensor] = {}
        sources: dict[str, list[str]] = {}
        for c, i in zip(convs, here):
            conv, norm = f"features.{c}", f"features.{c + 1}"
            names = [f"{norm}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
            w, b = state[f"{conv}.weight"], state.get(f"{conv}.bias")
            if any(n not in state or state[n].shape != (w.shape[0],) for n in names):
                return None
            gamma, beta, mean, var = (state[n].double() for n in names)
            s = gamma * torch.rsqrt(var + BATCHNORM_EPS)
            bias = torch.zeros_like(mean) if b is None else b.double()
            out[f"features.{i}.weight"] = (w.double() * s.reshape(-1, 1, 1, 1)).to(w.dtype)
            out[f"features.{i}.bias"] = ((bias - mean) * s + beta).to(w.dtype)
            used = [f"{conv}.weight"] + ([f"{conv}.bias"] if b is not None else []) + names
            sources[f"features.{i}.weight"] = sources[f"features.{i}.bias"] = used
        folded = {k for keys in sources.values() for k in keys}
        for k, v in state.items():
            if k not in folded and not (k.startswith("features.") and k.endswith(".num_batches_tracked")):
                out.setdefault(k, v)
                sources.setdefault(k, [k])
        return out, sources

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        return super().forward(self.normalize(x))
