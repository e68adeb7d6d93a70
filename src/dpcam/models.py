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

``weights=PATH`` loads a local state dict (see :func:`load_weights`); nothing is ever downloaded.

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

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.layers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdoptsBatchNorm,
    Normalize,
    batchnorm_layers,
    freeze_batchnorm_into,
    group_norm,
    restore_layers,
)
from dpcam.registry import Registry

log = logging.getLogger(__name__)

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
    state dict loaded by :func:`load_weights` after initialisation (``trainable: all``): every tensor
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


# ------------------------------------------------------------------------------------------ weights


@dataclass
class WeightsReport:
    """What :func:`load_weights` did with each tensor of the file, and what the model holds now.

    Every tensor of the file is in exactly one of ``used``, ``ignored``, ``excluded``, ``mismatched`` and
    ``unexpected`` (file keys), so ``in_file`` is the sum of their lengths (:meth:`summary` prints the counts).
    """

    path: Path
    in_file: int = 0  # tensors in the file
    used: list[str] = field(default_factory=list)  # file tensors the model now holds (as they are, or folded)
    ignored: list[str] = field(default_factory=list)  # BatchNorm step counters; the file's input normalisation
    excluded: list[str] = field(default_factory=list)  # of the part fine-tuning trains from initialisation (only)
    mismatched: list[str] = field(default_factory=list)  # of another shape than the model's tensor
    unexpected: list[str] = field(default_factory=list)  # no place for them in the model
    loaded: list[str] = field(default_factory=list)  # model tensors loaded
    shape_mismatch: list[str] = field(default_factory=list)  # "model key (file shape)→(model shape)"
    missing: list[str] = field(default_factory=list)  # model tensors left at initialisation
    folded: list[str] = field(default_factory=list)  # BatchNorm tensors folded into the conv before them
    frozen_batchnorm: list[str] = field(default_factory=list)  # model layers now holding the file's BatchNorm
    head: tuple[str, ...] = ()  # the model's head (finetune_layers["head"]): another class count is no error

    @property
    def skipped(self) -> list[str]:
        """File tensors that did not fit: of another shape or unknown to the model."""
        return self.mismatched + self.unexpected

    def _in_head(self, key: str) -> bool:
        return _under(key.split(" ")[0], self.head) if self.head else False

    @property
    def problems(self) -> list[str]:
        """What did not fit outside the head (a head for another class count is trained from initialisation)."""
        head_shapes = [s for s in self.shape_mismatch if self._in_head(s)]
        return (
            self.unexpected
            + [s for s in self.shape_mismatch if s not in head_shapes]
            + [k for k in self.missing if not self._in_head(k)]
        )

    def summary(self) -> str:
        """One line: the file's tensor count, how many the model uses, and what became of the others."""
        used = f"{len(self.used)} used"
        how = []
        if self.frozen_batchnorm:
            how.append(f"BatchNorm of {len(self.frozen_batchnorm)} layers as frozen statistics and affine")
        if self.folded:
            layers = len({k.rpartition(".")[0] for k in self.folded})
            how.append(f"{len(self.folded)} BatchNorm tensors of {layers} layers folded into the conv before them")
        used += f" ({'; '.join(how)})" if how else ""
        parts = [f"weights {self.path}: {self.in_file} tensors in the file, {used}"]
        counters = [k for k in self.ignored if k.endswith(".num_batches_tracked")]
        if counters:
            parts.append(f"{len(counters)} ignored (BatchNorm's num_batches_tracked: a step counter)")
        if len(counters) < len(self.ignored):
            n = len(self.ignored) - len(counters)
            parts.append(f"{n} ignored (the file's input normalisation: the model keeps its own)")
        if self.excluded:
            parts.append(f"{len(self.excluded)} not used: trained from initialisation ({_few(self.excluded)})")
        head = [s for s in self.shape_mismatch if self._in_head(s)]
        other = [s for s in self.shape_mismatch if s not in head]
        if head:
            parts.append(
                f"{len(head)} not used: the head is for another class count, trained from initialisation ({_few(head)})"
            )
        if other:
            parts.append(f"{len(other)} of another shape (file→model: {_few(other)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unknown to the model ({_few(self.unexpected)})")
        left = [k for k in self.missing if not self._in_head(k)]
        if left:
            parts.append(f"{len(left)} model tensors left at initialisation ({_few(left)})")
        return "; ".join(parts)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_PREFIXES = ("_module.", "module.")  # Opacus GradSampleModule, DataParallel
_STATISTICS = ("running_mean", "running_var")


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
    """Load a local state dict into ``model`` by name; returns the report of every tensor of the file.

    Reads with ``torch.load(weights_only=True)`` (nothing pickled is executed; nothing downloaded).
    Accepts a plain state dict, one under ``state_dict``/``model``/``model_state_dict``, and
    ``module.``/``_module.`` prefixes. BatchNorm weights (torchvision's ImageNet files):

    - a model that adopts them (``resnet18``: :class:`~dpcam.layers.AdoptsBatchNorm`) turns each GroupNorm
      the file holds BatchNorm weights for, and whose tensors it loads, into a
      :class:`~dpcam.layers.FrozenBatchNorm2d` (the file's statistics, fixed; its affine);
    - a model with a ``translate_state_dict`` method takes the file in its own layout (``vgg16`` folds a
      ``vgg16_bn`` file's BatchNorm into its convs);
    - ``num_batches_tracked`` (BatchNorm's step counter) is ignored.

    A tensor is not loaded when its shape differs (a head for another class count, the small-input stem)
    or the model has no place for it; what was not used is in the report, logged as one line (a warning
    when something outside the head did not fit). Raises UserError for a missing or unreadable file, or
    when no tensor matches.

    ``required``: state-dict keys that must load (the trunk, :func:`frozen_keys`; a frozen BatchNorm
    layer's statistics are added): one the file lacks or holds in another shape, or a file tensor with no
    place in the model (another architecture), is a UserError naming them, and the model is left as it was.
    ``only``: load no other key (a fine-tuning run's trained part keeps its initialisation: ``excluded``).
    """
    path = Path(path)
    file_state = _read_state_dict(path)
    report = WeightsReport(path, in_file=len(file_state), head=_head(model))
    own_keys = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for key, tensor in file_state.items():
        if key.endswith(".num_batches_tracked") and key not in own_keys:
            report.ignored.append(key)
        else:
            state[key] = tensor
    state, sources = _in_model_layout(model, state, report)
    replaced = _adopt_batchnorm(model, state, only)
    try:
        required, only = _with_statistics(required, only, replaced)
        own = model.state_dict()
        to_load = _sort_tensors(state, sources, own, only, report)
        _check_fit(model, path, file_state, required, to_load, report, fine_tuning=only is not None)
        if not to_load:
            raise UserError(
                f"--weights {path}: none of its {len(file_state)} tensors matches model {type(model).__name__} "
                f"(e.g. {next(iter(file_state), '-')}); give weights saved from the same architecture"
            )
    except UserError:
        restore_layers(model, replaced)
        raise
    model.load_state_dict(to_load, strict=False)
    report.folded = [k for k in report.folded if k in set(report.used)]
    report.frozen_batchnorm = sorted(replaced)
    report.missing = [
        k for k in own if k not in to_load and not k.startswith("normalize.") and (only is None or k in only)
    ]
    log.log(logging.WARNING if report.problems else logging.INFO, report.summary())
    return report


def _head(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "finetune_layers", {}).get("head", ()))


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


def _in_model_layout(
    model: nn.Module, state: dict[str, torch.Tensor], report: WeightsReport
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The file's tensors in the model's layout (``model.translate_state_dict``, e.g. vgg16_bn → vgg16) and, per
    key, the file tensors it was made from."""
    translate = getattr(model, "translate_state_dict", None)
    out = translate(state) if translate is not None else None
    if out is None:
        return state, {k: [k] for k in state}
    new, sources = out
    norms = set(batchnorm_layers(state))
    report.folded = sorted({k for keys in sources.values() for k in keys if k.rpartition(".")[0] in norms})
    return new, sources


def _adopt_batchnorm(
    model: nn.Module, state: dict[str, torch.Tensor], only: Collection[str] | None
) -> dict[str, nn.Module]:
    """GroupNorm → FrozenBatchNorm2d for the layers the file holds BatchNorm for and that are loaded (not the
    part trained from initialisation, which keeps GroupNorm); the layers replaced."""
    if not isinstance(model, AdoptsBatchNorm):
        return {}
    layers = [p for p in batchnorm_layers(state) if only is None or f"{p}.weight" in only]
    return freeze_batchnorm_into(model, layers)


def _with_statistics(
    required: Collection[str], only: Collection[str] | None, replaced: Collection[str]
) -> tuple[list[str], set[str] | None]:
    """``required`` and ``only`` with the statistics of the layers that became frozen BatchNorm."""
    required = list(required)
    wanted = set(required)
    for layer in replaced:
        if f"{layer}.weight" in wanted:
            required += [f"{layer}.{s}" for s in _STATISTICS]
    if only is not None:
        only = set(only) | {f"{layer}.{s}" for layer in replaced for s in _STATISTICS}
    return required, only


def _sort_tensors(
    state: dict[str, torch.Tensor],
    sources: dict[str, list[str]],
    own: dict[str, torch.Tensor],
    only: Collection[str] | None,
    report: WeightsReport,
) -> dict[str, torch.Tensor]:
    """Each tensor of the file either to load or into the report's reason not to."""
    # modules of the part trained from initialisation: a file tensor of theirs that the model lacks (the
    # BatchNorm statistics of a layer that stays GroupNorm) is excluded with them, not unknown
    trained = {k.rpartition(".")[0] for k in own if only is not None and k not in only}
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        files = sources.get(key, [key])
        if only is not None and key.startswith("normalize."):  # fixed input normalisation: the model's own
            report.ignored += files
        elif only is not None and key not in only and (key in own or key.rpartition(".")[0] in trained):
            report.excluded += files
        elif key not in own:
            report.unexpected += files
        elif tuple(own[key].shape) != tuple(tensor.shape):
            report.shape_mismatch.append(f"{key} {tuple(tensor.shape)}→{tuple(own[key].shape)}")
            report.mismatched += files
        else:
            to_load[key] = tensor
            report.loaded.append(key)
            report.used += files
    for name in ("used", "excluded", "mismatched", "unexpected", "ignored"):  # a folded BatchNorm feeds 2 tensors
        setattr(report, name, list(dict.fromkeys(getattr(report, name))))
    return to_load


def _check_fit(
    model: nn.Module,
    path: Path,
    file_state: dict[str, torch.Tensor],
    required: Collection[str],
    to_load: dict,
    report: WeightsReport,
    *,
    fine_tuning: bool,
) -> None:
    """UserError naming the required (trunk) tensors the file does not fit, by reason, and the file's tensors
    that have no place in the model (another architecture)."""
    unfit = [k for k in required if k not in to_load]
    unknown = report.unexpected if required else []
    if not unfit and not unknown:
        return
    shapes = {k.split(" ")[0]: k for k in report.shape_mismatch}
    wrong = [shapes[k] for k in unfit if k in shapes]
    missing = [k for k in unfit if k not in shapes]
    what = "; ".join(
        f"{label} {len(keys)}: {_few(keys)}"
        for label, keys in (
            ("missing", missing),
            ("of another shape (file→model)", wrong),
            ("unknown to the model", unknown),
        )
        if keys
    )
    part = "frozen trunk" if fine_tuning else "trunk"
    name = type(model).__name__
    lead = f"{len(unfit)} tensors of the {part} of {name} do not fit" if unfit else f"the file does not fit {name}"
    guess = _file_architecture(file_state)
    hint = ""
    if getattr(model, "small_input", False) and any(k.startswith("conv1.weight") for k in wrong):
        hint = (
            "; this model's small-input stem (3×3 conv1, the default for images of 96 px or less) is not the "
            "file's: set train.small_input: false for the ImageNet stem"
        )
    raise UserError(
        f"--weights {path}: {lead} ({what})"
        + (f"; the file looks like torchvision's {guess}" if guess else "")
        + hint
        + "; give weights saved from the same architecture (torchvision's state dict of resnet18, alexnet, "
        "vgg16 or vgg16_bn, or a dpcam trunk: models/public/<run>/model.pt)"
    )


_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_VGGS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}


def _file_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision architecture a state dict looks like, with its class count (for error messages)."""
    bn = any(k.endswith(".running_mean") for k in state)
    if "fc.weight" in state and any(k.startswith("layer1.") for k in state):
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        name = _RESNETS.get((blocks, any(".conv3." in k for k in state)), f"a ResNet of {blocks} blocks")
        return f"{name} ({state['fc.weight'].shape[0]} classes)"
    convs = [k for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4]
    head = state.get("classifier.6.weight")
    if convs and head is not None:
        name = "alexnet" if len(convs) == 5 else _VGGS.get(len(convs), f"a VGG of {len(convs)} convs")
        if name.startswith("vgg") and bn:
            name += "_bn"
        return f"{name} ({head.shape[0]} classes)"
    return None


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
