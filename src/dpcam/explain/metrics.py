"""The explanation metrics' registry (docs/metrics.md): every per-image metric of the families under one name.

The families, each a module of pure, batched tensor functions:

- :mod:`dpcam.explain.confidence`: the paper's confidence metrics and their masking baselines;
- :mod:`dpcam.explain.faithfulness`: deletion/insertion (RISE) and ROAD (its imputation:
  :mod:`dpcam.explain.imputation`);
- :mod:`dpcam.explain.localisation`: the pointing games on lesion masks;
- :mod:`dpcam.explain.agreement`: map agreement (with the non-private run's maps, the randomisation check);

on inputs made the same way for all (:mod:`dpcam.explain.inputs`), means streamed by
:mod:`dpcam.explain.streaming` and the model-level check of :mod:`dpcam.explain.degeneracy`.

Shapes (every family's function accepts tensors on any device; results live on ``x``'s / ``maps``' device):

- ``x``: float ``(B, C, H, W)`` pixel-space images in [0, 1] (dpcam models normalise internally);
- ``maps``: float ``(B, H, W)`` explanation maps in [0, 1] (:func:`dpcam.explain.gradcam.gradcam`);
- ``target``: long ``(B,)`` the class explained (c); ``labels``: long ``(B,)`` the true classes;
- ``probs``: optional float ``(B, num_classes)`` softmax on ``x`` from the Grad-CAM pass, which
  saves the metrics a forward pass over ``x``;
- ``masks``: float or bool ``(B, H, W)``, 1 on lesion pixels;
- ``indices``: long ``(B,)`` the images' indices in their dataset, which seed each image's random
  numbers (the random maps of :func:`~dpcam.explain.confidence.masking_baselines`, ROAD's noise), so
  reruns and other batch sizes draw the same numbers for the same image.

Per-image functions return ``(B,)`` tensors; means over a test set of any size are streamed with
:class:`~dpcam.explain.streaming.RunningMean`, and the model-level degeneracy flag with
:class:`~dpcam.explain.degeneracy.DegeneracyStats`.

The registry :data:`METRICS` names every per-image metric with a uniform entry point
(``METRICS[name](ExplainBatch(...), **options) -> (values, valid)``) so a streaming scorer can pick
metrics by name from params, skip those whose inputs are missing (e.g. masks) with a note, and feed
the results straight into a :class:`~dpcam.explain.streaming.RunningMean`.

Each family's adapter and its ``METRICS.add(Metric(...))`` live here: this module imports the families and
they import nothing from it, so filling the registry needs no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.explain.agreement import map_agreement
from dpcam.explain.confidence import confidence_drop, masking_baselines
from dpcam.explain.faithfulness import (
    DEFAULT_BLUR_KERNEL,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_STEPS,
    deletion_insertion,
    road,
)
from dpcam.explain.localisation import energy_pointing_game, has_mask, pointing_game, random_pointing
from dpcam.registry import Registry

# ---------------------------------------------------------------------------------- registry


@dataclass
class ExplainBatch:
    """What a scorer has for one batch; the registry's metrics read the fields they need.

    ``x`` ``(B, C, H, W)``, ``maps``/``reference_maps``/``random_maps``/``masks`` ``(B, H, W)``,
    ``target``/``labels`` ``(B,)``, ``probs`` ``(B, num_classes)`` (softmax on ``x``).
    ``reference_maps``: the non-private run's maps of the same images; ``random_maps``: the
    maps of :func:`dpcam.explain.gradcam.random_init_copy` of the model for the same targets;
    ``indices``: long ``(B,)`` the images' indices in their dataset, which seed each image's random
    numbers (random maps, ROAD's noise), so that they do not depend on the batch.
    """

    model: nn.Module
    x: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    reference_maps: torch.Tensor | None = None
    random_maps: torch.Tensor | None = None
    indices: torch.Tensor | None = None


# (batch, **options) -> (values: key -> (B,), valid: key -> bool (B,) for keys with gaps)
Compute = Callable[..., tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Metric:
    """A registered per-image metric: ``metric(batch, **options) -> (values, valid)``.

    ``keys``: the per-image keys it yields (their means are the reported metrics);
    ``needs``: :class:`ExplainBatch` fields it requires beyond model/x/maps/target;
    ``options``: keyword options it accepts (e.g. ``steps``).
    """

    name: str
    compute: Compute
    keys: tuple[str, ...]
    needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    description: str = ""

    def missing(self, batch: ExplainBatch) -> list[str]:
        """Names of the needed inputs the batch lacks (a scorer skips the metric with a note)."""
        return [f for f in self.needs if getattr(batch, f) is None]

    def __call__(self, batch: ExplainBatch, **options) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise UserError(f"metric {self.name!r} has no option {unknown[0]!r}; its options: {known}")
        lacking = self.missing(batch)
        if lacking:
            raise UserError(f"metric {self.name!r} needs {', '.join(lacking)}, which this batch lacks")
        return self.compute(batch, **options)


METRICS: Registry[Metric] = Registry("explanation metric")  # filled by METRICS.add below


def get_metrics(names: Sequence[str]) -> list[Metric]:
    """The registered metrics named (in order); UserError listing the known names for an unknown one."""
    return [METRICS.lookup(str(name).lower()) for name in names]


# ------------------------------------------------------- the families' adapters and registrations


def _confidence(batch: ExplainBatch, max_batch: int | None = None):
    out = confidence_drop(
        batch.model, batch.x, batch.maps, batch.target, batch.labels, probs=batch.probs, max_batch=max_batch
    )
    values = {k: out[k] for k in ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")}
    values["confidence_y"] = out["Y"]
    valid = {}
    if "masked_accuracy_pct" in out:
        values["masked_accuracy_pct"] = out["masked_accuracy_pct"]
    else:
        values["masked_accuracy_pct"] = torch.zeros_like(out["O"])
        valid["masked_accuracy_pct"] = torch.zeros_like(out["O"], dtype=torch.bool)
    return values, valid


def _deletion_insertion(
    batch: ExplainBatch,
    steps: int = DEFAULT_STEPS,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    blur_kernel: int = DEFAULT_BLUR_KERNEL,
    max_batch: int | None = None,
):
    d, i = deletion_insertion(
        batch.model,
        batch.x,
        batch.maps,
        batch.target,
        steps,
        blur_sigma,
        blur_kernel=blur_kernel,
        probs=batch.probs,
        max_batch=max_batch,
    )
    return {"deletion_auc": d, "insertion_auc": i}, {}


def _masking_baselines(batch: ExplainBatch, seed: int = 0, max_batch: int | None = None):
    out = masking_baselines(
        batch.model, batch.x, batch.maps, batch.target, batch.indices, seed, probs=batch.probs, max_batch=max_batch
    )
    return {k: out[k] for k in METRICS["masking-baselines"].keys}, {}


def _road(batch: ExplainBatch, seed: int = 0, max_batch: int | None = None):
    out = road(batch.model, batch.x, batch.maps, batch.target, batch.indices, seed, max_batch=max_batch)
    return {k: out[k] for k in METRICS["road"].keys}, {}


def _pointing(batch: ExplainBatch, tolerance: int | None = None):
    hits, valid = pointing_game(batch.maps, batch.masks, tolerance)
    rate, _ = random_pointing(batch.masks.to(batch.maps.device), tolerance)
    return {"pointing_game": hits, "pointing_game_random": rate}, {
        "pointing_game": valid,
        "pointing_game_random": valid,
    }


def _energy(batch: ExplainBatch):
    return {"energy_pointing_game": energy_pointing_game(batch.maps, batch.masks)}, {
        "energy_pointing_game": has_mask(batch.masks)
    }


def _agreement(batch: ExplainBatch):
    rho = map_agreement(batch.maps, batch.reference_maps)
    return {"map_agreement": rho}, {"map_agreement": torch.isfinite(rho)}


def _randomisation(batch: ExplainBatch):
    rho = map_agreement(batch.maps, batch.random_maps)
    return {"randomisation_agreement": rho}, {"randomisation_agreement": torch.isfinite(rho)}


METRICS.add(
    Metric(
        "confidence",
        _confidence,
        ("avg_drop_pct", "increase_conf_pct", "masked_score_pct", "masked_accuracy_pct", "confidence_y"),
        options=("max_batch",),
        description="Average Drop %, Increase in Confidence %, masked score % and masked accuracy % (one forward of x̃)"
        ", and the confidence Y they start from",
    )
)
METRICS.add(
    Metric(
        "masking-baselines",
        _masking_baselines,
        ("mask_sensitivity_pct", "avg_drop_random_pct", "increase_conf_random_pct", "masked_score_random_pct"),
        needs=("indices",),
        options=("seed", "max_batch"),
        description="the confidence metrics of uninformative maps of the same mass: the drop under a constant map "
        "(masking sensitivity) and the paper's metrics of the map's pixels in random order (two forwards)",
    )
)
METRICS.add(
    Metric(
        "deletion-insertion",
        _deletion_insertion,
        ("deletion_auc", "insertion_auc"),
        options=("steps", "blur_sigma", "blur_kernel", "max_batch"),
        description="RISE deletion and insertion AUC over K steps to/from the blurred image",
    )
)
METRICS.add(
    Metric(
        "road",
        _road,
        ("road_morf_auc", "road_lerf_auc", "road_gap"),
        needs=("indices",),
        options=("seed", "max_batch"),
        description="ROAD (Rong et al. 2022): MoRF and LeRF areas of p(c) with pixels removed by noisy linear "
        "imputation at 10-90 %, and their gap (ten forwards)",
    )
)
METRICS.add(
    Metric(
        "pointing-game",
        _pointing,
        ("pointing_game", "pointing_game_random"),
        needs=("masks",),
        options=("tolerance",),
        description="share of maps with a maximal pixel within t px (a disc) of the lesion mask; lesion images only",
    )
)
METRICS.add(
    Metric(
        "energy-pointing-game",
        _energy,
        ("energy_pointing_game",),
        needs=("masks",),
        description="share of the map's energy inside the lesion mask; images with lesions only",
    )
)
METRICS.add(
    Metric(
        "map-agreement",
        _agreement,
        ("map_agreement",),
        needs=("reference_maps",),
        description="Spearman correlation with the non-private run's maps of the same images",
    )
)
METRICS.add(
    Metric(
        "randomisation",
        _randomisation,
        ("randomisation_agreement",),
        needs=("random_maps",),
        description="Spearman correlation with the maps of a re-initialised copy "
        "(Adebayo et al.; high = maps ignore the model)",
    )
)
