"""Loading a local state dict into a dpcam model: what fits, what is folded (a ``vgg16_bn`` file's BatchNorm),
what stays frozen (BatchNorm statistics), and one line for what does not fit (:func:`load_weights`)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.layers import AdoptsBatchNorm, batchnorm_layers, freeze_batchnorm_into, restore_layers

log = logging.getLogger(__name__)


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


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)
