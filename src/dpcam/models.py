"""Model registry: Opacus-safe classifiers that take pixel-space input and name their Grad-CAM layer.

Every model built here

- takes **pixel-space** input ``x`` of shape ``(B, 3, H, W)``, float in [0, 1], and normalises it
  itself as its first operation (:class:`Normalize`, fixed buffers, ImageNet mean/std by default),
  so Grad-CAM masking (docs/metrics.md: x̃ = x ⊙ L(x)) happens in pixel space;
- returns logits of shape ``(B, num_classes)``;
- is valid for Opacus (``ModuleValidator.validate(model, strict=False) == []``) and free of
  in-place operations, so both ``grad_sample_mode="hooks"`` and ``"ew"`` work: BatchNorm is
  replaced by GroupNorm, every ReLU is out-of-place and ResNet's ``out += identity`` is
  ``out = out + identity``;
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

``weights=PATH`` loads a local state dict (see :func:`load_weights`); nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize, group_norm

log = logging.getLogger(__name__)

SMALL_INPUT_MAX = 96  # small_input defaults to True for image_size <= this

# A builder: (num_classes, image_size, *, small_input, **kwargs) -> nn.Module with .gradcam_layer
Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder under ``name`` in :data:`MODELS`.

    The builder is called as ``builder(num_classes, image_size, *, small_input: bool, **kwargs)``
    and must return a module that takes pixel-space ``(B, 3, H, W)`` input in [0, 1], returns
    ``(B, num_classes)`` logits, and sets ``gradcam_layer`` to a dotted submodule name.
    """

    def decorator(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


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


@register_model("smallcnn")
def _smallcnn(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    """SmallCNN (``small_input`` has no effect: it is built for small inputs)."""
    return SmallCNN(num_classes, **kwargs)


# ------------------------------------------------------------------- torchvision architectures
# The classes live in dpcam.tvmodels: importing torchvision's model zoo costs about 2 s, so the
# builders import it only when one of these models is asked for (smallcnn processes never pay).


@register_model("resnet18")
def _resnet18(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    from dpcam.tvmodels import ResNet18

    return ResNet18(num_classes, small_input, **kwargs)


@register_model("alexnet")
def _alexnet(num_classes: int, image_size: int, *, small_input: bool, **kwargs) -> nn.Module:
    from dpcam.tvmodels import AlexNet

    return AlexNet(num_classes, small_input, **kwargs)


@register_model("vgg16")
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
    state dict loaded by :func:`load_weights` after initialisation. ``kwargs`` go to the builder
    (e.g. ``widths=(16, 32, 32, 64)`` for smallcnn; ``mean``/``std`` for every model).
    Raises UserError for an unknown name, fewer than 2 classes, an image too small for the model,
    or bad weights.
    """
    key = name.lower()
    if key not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if int(num_classes) < 2:
        raise UserError(
            f"model {key}: num_classes = {num_classes}; "
            "a classifier needs at least 2 classes (check the dataset's labels)"
        )
    if int(image_size) < 1:
        raise UserError(f"model {key}: image_size = {image_size} must be a positive number of pixels")
    if small_input is None:
        small_input = image_size <= SMALL_INPUT_MAX
    build = MODELS[key]
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
        load_weights(model, weights)
    return model


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


# ------------------------------------------------------------------------------------------ weights


@dataclass
class WeightsReport:
    """What :func:`load_weights` did, by state-dict key."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    batchnorm: list[str] = field(default_factory=list)  # BatchNorm tensors with no GroupNorm counterpart
    shape_mismatch: list[str] = field(default_factory=list)  # e.g. a classifier head for other classes
    unexpected: list[str] = field(default_factory=list)  # keys the model does not have
    missing: list[str] = field(default_factory=list)  # model tensors left at initialisation
    excluded: list[str] = field(default_factory=list)  # not asked for (``only``): what fine-tuning trains afresh

    @property
    def skipped(self) -> list[str]:
        return self.batchnorm + self.shape_mismatch + self.unexpected

    def summary(self) -> str:
        """One line: counts and a few names of every category."""

        def few(keys: list[str]) -> str:
            shown = ", ".join(keys[:4])
            return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 4 else shown

        parts = [f"weights {self.path}: loaded {len(self.loaded)} tensors"]
        if self.batchnorm:
            parts.append(
                f"skipped {len(self.batchnorm)} BatchNorm tensors (no GroupNorm counterpart; GroupNorm kept at init)"
            )
        if self.shape_mismatch:
            parts.append(f"skipped {len(self.shape_mismatch)} of another shape ({few(self.shape_mismatch)})")
        if self.unexpected:
            parts.append(f"skipped {len(self.unexpected)} unknown to the model ({few(self.unexpected)})")
        if self.missing:
            parts.append(f"{len(self.missing)} model tensors left at initialisation ({few(self.missing)})")
        if self.excluded:
            parts.append(f"{len(self.excluded)} tensors not loaded: trained from initialisation ({few(self.excluded)})")
        return "; ".join(parts)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_PREFIXES = ("_module.", "module.")  # Opacus GradSampleModule, DataParallel


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _state_dict_from(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded object: a state dict, or one under a common wrapper key."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = dict(obj)
            for prefix in _PREFIXES:
                if all(k.startswith(prefix) for k in state):
                    state = {k[len(prefix) :]: v for k, v in state.items()}
            return state
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                return _state_dict_from(obj[k], path)
    raise UserError(
        f"--weights {path}: holds a {type(obj).__name__}, not a state dict of tensors; "
        "save one with torch.save(model.state_dict(), PATH)"
    )


def load_weights(
    model: nn.Module, path: Path | str, *, required: Collection[str] = (), only: Collection[str] | None = None
) -> WeightsReport:
    """Load a local state dict into ``model`` by name, skipping what cannot map; returns the report.

    Reads with ``torch.load(weights_only=True)`` (nothing pickled is executed; nothing downloaded).
    Accepts a plain state dict, one under ``state_dict``/``model``/``model_state_dict``, and
    ``module.``/``_module.`` prefixes. Tensors are skipped when they belong to a BatchNorm layer
    in the file whose module here is not BatchNorm (GroupNorm cannot use batch statistics or
    their affine terms), when their shape differs (a classifier head for another number of
    classes, the small-input stem), or when the model has no such key. Anything skipped or left
    at initialisation is logged as one warning line. Raises UserError for a missing or unreadable
    file, or when no tensor matches.

    ``required``: state-dict keys that must load (a fine-tuning run's frozen trunk, :func:`frozen_keys`): one
    that the file lacks or holds in another shape is a UserError naming them, and nothing is loaded.
    ``only``: load no other key (a fine-tuning run's trained part keeps its initialisation: ``excluded``).
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    report, to_load = _sort_tensors(model, state, own, only, WeightsReport(path))
    _check_required(model, path, required, to_load, report)
    if not to_load:
        raise UserError(
            f"--weights {path}: none of its {len(state)} tensors matches model {type(model).__name__} "
            f"(e.g. {next(iter(state), '-')}); give weights saved from the same architecture"
        )
    model.load_state_dict(to_load, strict=False)
    report.missing = [
        k for k in own if k not in to_load and not k.startswith("normalize.") and (only is None or k in only)
    ]
    if report.skipped or report.missing:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return report


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in the file at ``path`` (weights-only load); UserError when missing or unreadable."""
    if not path.is_file():
        raise UserError(
            f"--weights {path}: no such file; give a local state dict saved with torch.save (nothing is downloaded)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--weights {path}: not a weights-only torch file ({first[:160]}); "
            "save it with torch.save(model.state_dict(), PATH)"
        ) from None
    return _state_dict_from(obj, path)


def _sort_tensors(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    only: Collection[str] | None,
    report: WeightsReport,
) -> tuple[WeightsReport, dict[str, torch.Tensor]]:
    """Each tensor of the file either to load or into the report's reason to skip it."""
    modules = dict(model.named_modules())
    bn_prefixes = {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = key.rpartition(".")[0]
        if prefix in bn_prefixes and not isinstance(modules.get(prefix), nn.modules.batchnorm._BatchNorm):
            report.batchnorm.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif only is not None and key not in only:
            if not key.startswith("normalize."):  # fixed input normalisation: the model's own, never trained
                report.excluded.append(key)
        elif tuple(own[key].shape) != tuple(tensor.shape):
            report.shape_mismatch.append(f"{key} {tuple(tensor.shape)}→{tuple(own[key].shape)}")
        else:
            to_load[key] = tensor
            report.loaded.append(key)
    return report, to_load


def _check_required(
    model: nn.Module, path: Path, required: Collection[str], to_load: dict, report: WeightsReport
) -> None:
    """UserError naming the required (frozen trunk) tensors the file does not fit, by reason."""
    unfit = [k for k in required if k not in to_load]
    if not unfit:
        return
    shapes = {k.split(" ")[0]: k for k in report.shape_mismatch}
    bn = [k for k in unfit if k in report.batchnorm]
    wrong = [shapes[k] for k in unfit if k in shapes]
    missing = [k for k in unfit if k not in shapes and k not in bn]
    what = "; ".join(
        f"{label} {len(keys)}: {_few(keys)}"
        for label, keys in (
            ("missing", missing),
            ("of another shape (file→model)", wrong),
            ("BatchNorm in the file, GroupNorm here", bn),
        )
        if keys
    )
    raise UserError(
        f"--weights {path}: {len(unfit)} tensors of the frozen trunk of {type(model).__name__} do not fit "
        f"({what}); "
        "fine-tuning only the head or last block needs every trunk tensor from the weights: give weights saved "
        "from the same architecture (e.g. models/public/<run>/model.pt), or train all parameters (trainable all)"
    )


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


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)


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
