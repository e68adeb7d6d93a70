"""The paper's torchvision architectures, made Opacus-safe (see :mod:`dpcam.models` for the departures).

A module of its own because importing torchvision's model zoo costs about 2 s: the registered
builders in :mod:`dpcam.models` import it only when a resnet18, alexnet or vgg16 is asked for,
so processes that train or explain the CPU default (smallcnn) never pay for it.
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

from dpcam.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize, group_norm, out_of_place

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


class ResNet18(_TVResNet):
    """torchvision ResNet-18 with GroupNorm, out-of-place blocks, pixel-space input.

    ``small_input``: 3×3 stride-1 stem and no stem max-pool (``layer4`` at H/8 instead of H/32).
    State-dict keys are torchvision's (plus ``normalize.*``), so ImageNet weights map by name.
    """

    gradcam_layer = "layer4"
    finetune_layers = {"head": ("fc",), "last-block": ("layer4", "fc")}

    def __init__(self, num_classes: int, small_input: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(_BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=group_norm)
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
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
        self.normalize = Normalize(mean, std)
        out_of_place(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        return super().forward(self.normalize(x))


# ------------------------------------------------------------------------------------------ vgg16


class VGG16(_TVVGG):
    """torchvision VGG-16 (configuration D, no BatchNorm), out-of-place ReLUs, pixel-space input.

    Target ``features.29`` (the last conv ReLU). ``small_input``: the fourth max-pool
    (``features.23``) is an identity, so the last conv block is H/8 wide (8×8 at 64 px).
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
        self.normalize = Normalize(mean, std)
        out_of_place(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        return super().forward(self.normalize(x))
