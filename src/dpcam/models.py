"""Model registry: Opacus-safe classifiers that take pixel-space input and name their Grad-CAM layer.

Every model built here

- takes **pixel-space** input ``x`` of shape ``(B, 3, H, W)``, float in [0, 1], and normalises it
  itself as its first operation (:class:`Normalize`, fixed buffers, ImageNet mean/std by default),
  so Grad-CAM masking (docs/metrics.md: x̃ = x ⊙ L(x)) happens in pixel space;
- returns logits of shape ``(B, num_classes)``;
- is valid for Opacus (``ModuleValidator.validate(model, strict=False) == []``) and free of
  in-place operations, so both ``grad_sample_mode="hooks"`` and ``"ew"`` work: BatchNorm is
  replaced by GroupNorm (or, for pretrained BatchNorm weights, frozen BatchNorm: below), every ReLU
  is out-of-place and ResNet's ``out += identity`` is ``out = out + identity``;
- names its Grad-CAM target layer in ``model.gradcam_layer`` (a dotted submodule name), which
  :func:`target_layer` resolves.

Registered models (``MODELS``):

``smallcnn``
    The CPU default: ``len(widths)`` blocks of conv3×3 → GroupNorm → tanh with a 2×2 max-pool
    between blocks, then global average pooling and a linear head. Default widths
    (16, 32, 32): about 15 k parameters; the target layer (the last block) is H/4 wide, 8×8 at
    the quick study's 32 px (four blocks (8, 16, 32, 32) gave 4×4 maps there: too coarse to point).
    tanh rather than ReLU: bounded activations train better under DP-SGD (Papernot et al. 2021);
    on the built-in data it gave +3.5 points of test accuracy at ε = 5 (``act="relu"`` restores ReLU).
``resnet18``, ``alexnet``, ``vgg16``
    The paper's torchvision architectures (random init, never downloaded). Departures from
    torchvision, all parameter-shape preserving except ResNet's small-input stem:

    - ``resnet18``: BatchNorm → GroupNorm(g, C) with g = gcd(C, 32) (32 for every ResNet-18 width);
      out-of-place residual block. ``small_input=True`` (default when ``image_size <= 96``):
      CIFAR-style 3×3 stride-1 stem conv and no stem max-pool, so ``layer4`` (the target) is
      8×8 at 64 px instead of 2×2.
    - ``alexnet``: out-of-place ReLUs. ``small_input=True``: conv1 keeps its 11×11 kernel but
      uses stride 2 / padding 5 (instead of 4 / 2) and the three max-pools get padding 1, so
      64 px gives an 8×8 target (``features.11``, the last conv ReLU) instead of 3×3, and the
      feature stack no longer collapses to 1×1 before the classifier.
    - ``vgg16``: out-of-place ReLUs. ``small_input=True``: the fourth max-pool
      (``features.23``) becomes an identity, so the last conv block runs at 8×8 at 64 px and the
      target (``features.29``, the last conv ReLU) is 8×8 instead of 4×4.

    AlexNet and VGG keep torchvision's classifier (``AdaptiveAvgPool2d((6, 6))`` /
    ``((7, 7))`` then the 4096-wide fully-connected layers), so ImageNet state dicts load; note
    that these heads hold most of the parameters (≈ 57 M and ≈ 134 M), and per-sample gradients
    under DP-SGD cost batch size × that much memory.

``weights=PATH`` loads a local state dict (see :func:`dpcam.weights.load_weights`); nothing is ever downloaded.

Pretrained BatchNorm weights (torchvision's ImageNet files; docs/paper-profile.md says how to get one
onto a machine without internet) are used as a frozen affine, never as batch statistics:

- ``resnet18``: each GroupNorm whose tensors the file fills becomes a
  :class:`~dpcam.layers.FrozenBatchNorm2d` under the same name: the file's running statistics fixed for
  good (training mode too), its affine ``weight``/``bias`` as parameters. Frozen with the trunk
  (``trainable: head``; ``last-block`` freezes all but ``layer4`` and ``fc``) they are constants; with
  ``trainable: all`` the affine trains with per-example gradients that Opacus clips and noises like any
  other, while the statistics stay the public data's. A part trained from initialisation (``layer4``
  under ``last-block``, as every fine-tuned part in dpcam) keeps GroupNorm: the file's statistics describe
  convs that are not there. The saved model.pt says by its keys which layers are frozen BatchNorm, so
  ``saved.load_model`` rebuilds it from model.json unchanged.
- ``vgg16`` is torchvision's ``vgg16`` (no BatchNorm), whose files load as they are; a ``vgg16_bn`` file
  loads with each BatchNorm folded into the conv before it (exact in eval mode), so the model, its layer
  names and its saved format stay ``vgg16``'s. ``alexnet`` has no BatchNorm.

Either way the model computes what torchvision's computes in eval mode (tests/test_tvmodels.py: within
1e-4 of the outputs' scale, float32 rounding), and nothing in it computes a batch statistic, so
per-example gradients stay per-example (DP-SGD's clipping bounds each example's influence). Training a
frozen BatchNorm's affine (``trainable: all``) needs ``grad_sample_mode`` hooks, functorch or ghost:
torch's expanded weights (``ew``) have no per-channel product (refused in one line).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.layers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    group_norm,
)
from dpcam.registry import Registry
from dpcam.weights import _under, load_weights

SMALL_INPUT_MAX = 96  # small_input defaults to True for image_size <= this

# A builder: (num_classes, image_size, *, small_input, **kwargs) -> nn.Module with .gradcam_layer
Builder = Callable[..., nn.Module]
# Registered with ``@MODELS.register(name)``. The builder is called as ``builder(num_classes,
# image_size, *, small_input: bool, **kwargs)`` and must return a module that takes pixel-space
# ``(B, 3, H, W)`` input in [0, 1], returns ``(B, num_classes)`` logits, and sets
# ``gradcam_layer`` to a dotted submodule name.
MODELS: Registry[Builder] = Registry("model")


# --------------------------------------------------------------------------------------- smallcnn


class SmallCNN(nn.Module):
    """``len(widths)`` conv3×3 → GroupNorm → ``act`` blocks, 2×2 max-pool between blocks, GAP, linear.

    Input ``(B, 3, H, W)`` pixel space; the last block (the Grad-CAM target) is
    ``H / 2**(len(widths) - 1)`` wide (8×8 at 32 px with the default three widths).
    ``gn_groups`` caps the GroupNorm groups (gcd(C, gn_groups) groups per block).
    """

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 32),
        gn_groups: int = 8,
        act: str = "tanh",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise UserError(f"smallcnn widths {widths}: give one or more positive channel counts, e.g. 16,32,32")
        acts = {"tanh": nn.Tanh, "relu": lambda: nn.ReLU(inplace=False)}
        if act not in acts:
            raise UserError(f"smallcnn act {act!r}: choose one of {', '.join(acts)}")
        self.normalize = Normalize(mean, std)
        layers: list[tuple[str, nn.Module]] = []
        c_in = 3
        for i, c in enumerate(widths, start=1):
            if i > 1:
                layers.append((f"pool{i - 1}", nn.MaxPool2d(2)))
            block = nn.Sequential(nn.Conv2d(c_in, c, kernel_size=3, padding=1), group_norm(c, gn_groups), acts[act]())
            layers.append((f"block{i}", block))
            c_in = c
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.gradcam_layer = f"features.block{len(widths)}"
        self.finetune_layers = {"head": ("classifier",), "last-block": (self.gradcam_layer, "classifier")}
        if act == "relu":  # tanh keeps PyTorch's default init (what was measured)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel space in [0, 1] → (B, num_classes) logits."""
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


@MODELS.register("smallcnn")
def _smallcnn(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    """SmallCNN (``small_input`` has no effect: it is built for small inputs)."""
    return SmallCNN(num_classes, **kwargs)


# ------------------------------------------------------------------- torchvision architectures
# The classes live in dpcam.tvmodels: importing torchvision's model zoo costs about 2 s, so the
# builders import it only when one of these models is asked for (smallcnn processes never pay).


@MODELS.register("resnet18")
def _resnet18(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    from dpcam.tvmodels import ResNet18

    return ResNet18(num_classes, small_input, **kwargs)


@MODELS.register("alexnet")
def _alexnet(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    from dpcam.tvmodels import AlexNet

    return AlexNet(num_classes, small_input, **kwargs)


@MODELS.register("vgg16")
def _vgg16(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    from dpcam.tvmodels import VGG16

    return VGG16(num_classes, small_input, **kwargs)


# ------------------------------------------------------------------------------------ public API


def create_model(
    name: str,
    num_classes: int,
    image_size: int = 64,
    *,
    weights: Path | str | None = None,
    small_input: bool | None = None,
    seed: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build registered model ``name`` for ``num_classes`` classes and square ``image_size`` inputs.

    Returns a module mapping pixel-space float ``(B, 3, image_size, image_size)`` in [0, 1] to
    ``(B, num_classes)`` logits, in training mode, with ``gradcam_layer`` set.
    ``small_input``: None → ``image_size <= 96``. ``seed``: deterministic initialisation that
    leaves the global RNG untouched (None → draws from the global RNG). ``weights``: a local
    state dict loaded by :func:`dpcam.weights.load_weights` after initialisation (``trainable: all``): every tensor
    of the model but the head's must come from it and every tensor of the file must have a place in the
    model (UserError otherwise); the head loads when it is for the same classes and is trained from
    initialisation when not (ImageNet's 1000 classes). ``kwargs`` go to the builder
    (e.g. ``widths=(16, 32, 32, 64)`` for smallcnn; ``mean``/``std`` for every model).
    Raises UserError for an unknown name, fewer than 2 classes, an image too small for the model,
    or bad weights.
    """
    key = name.lower()
    build = MODELS.lookup(key)
    if int(num_classes) < 2:
        raise UserError(
            f"model {key}: num_classes = {num_classes}; "
            "a classifier needs at least 2 classes (check the dataset's labels)"
        )
    if int(image_size) < 1:
        raise UserError(f"model {key}: image_size = {image_size} must be a positive number of pixels")
    if small_input is None:
        small_input = image_size <= SMALL_INPUT_MAX
    if seed is None:
        model = build(int(num_classes), int(image_size), small_input=bool(small_input), **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(int(num_classes), int(image_size), small_input=bool(small_input), **kwargs)
    if not isinstance(getattr(model, "gradcam_layer", None), str):
        raise TypeError(f"model builder {key!r} did not set model.gradcam_layer")
    target_layer(model)  # the named layer must exist
    _check_input_size(key, model, int(image_size), bool(small_input))
    if weights is not None:
        load_weights(model, weights, required=trunk_keys(model))
    return model


def trunk_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a weights file must hold for ``model`` trained whole (``trainable: all``): all but the
    head's (which may be for other classes) and the fixed input normalisation."""
    if "head" in getattr(model, "finetune_layers", {}):
        return frozen_keys(model, "head")
    return [k for k in model.state_dict() if not k.startswith("normalize.")]


def _check_input_size(key: str, model: nn.Module, image_size: int, small_input: bool) -> None:
    """Raise UserError when ``image_size`` pixels shrink to nothing inside ``model``.

    Probes the freshly built model with one black image per size (eval mode, no gradients, so no
    random numbers are drawn). Real tensors, not meta ones: meta kernels import torch._dynamo,
    which costs every process about 2 s.
    """

    def runs(size: int) -> bool:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        except (RuntimeError, ValueError):  # an empty feature map; GroupNorm on one value per group
            return False
        finally:
            model.train(was_training)
        return True

    if runs(int(image_size)):
        return
    ok = next((s for s in (8, 16, 32, 64, 128, 256, 512) if s > image_size and runs(s)), None)
    hint = f"use images of at least {ok} px" if ok else "use larger images"
    raise UserError(
        f"model {key} (small_input={small_input}): {image_size} px images are too small "
        f"for its feature stack; {hint} (prepare --size)"
    )


def target_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM target layer named by ``model.gradcam_layer`` (an Opacus wrapper is unwrapped)."""
    inner = getattr(model, "_module", model)  # GradSampleModule and friends keep the model in _module
    name = getattr(inner, "gradcam_layer", None)
    if not isinstance(name, str):
        raise UserError(
            f"{type(inner).__name__} names no Grad-CAM layer (gradcam_layer); build it with dpcam.models.create_model"
        )
    try:
        return inner.get_submodule(name)
    except AttributeError:
        raise UserError(f"{type(inner).__name__}: Grad-CAM layer {name!r} is not a submodule of the model") from None


# ------------------------------------------------------------------------------------------ fine-tuning


def trained_prefixes(model: nn.Module, trainable: str) -> tuple[str, ...]:
    """The submodules ``trainable`` trains (``model.finetune_layers``); ``("",)`` (everything) for ``all``."""
    if trainable == "all":
        return ("",)
    layers = getattr(model, "finetune_layers", {})
    if trainable not in ("head", "last-block"):
        raise UserError(f"trainable {trainable!r}: choose all, head or last-block")
    if trainable not in layers:
        raise UserError(
            f"{type(model).__name__} names no {trainable} (finetune_layers); train it whole (trainable all)"
        )
    return tuple(layers[trainable])


def frozen_keys(model: nn.Module, trainable: str) -> list[str]:
    """State-dict keys of what ``trainable`` leaves frozen (the trunk), without the fixed input normalisation."""
    prefixes = trained_prefixes(model, trainable)
    if prefixes == ("",):
        return []
    return [k for k in model.state_dict() if not _under(k, prefixes) and not k.startswith("normalize.")]


def freeze(model: nn.Module, trainable: str) -> list[str]:
    """Leave only ``trainable``'s parameters with ``requires_grad`` (the trunk frozen); returns their names.

    ``all`` trains every parameter. The frozen parameters get no gradient, so Opacus computes per-example
    gradients, clips and noises only the trained ones: a DP run's private parameters are exactly these.
    """
    prefixes = trained_prefixes(model, trainable)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(_under(name, prefixes))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise UserError(f"trainable {trainable!r}: no parameter of {type(model).__name__} is under {prefixes}")
    return names
