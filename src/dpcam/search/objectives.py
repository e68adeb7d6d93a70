"""The three objectives of a search: achieved ε (↓), validation accuracy (↑), an explanation metric (↑).

:data:`OBJECTIVES` is the registry of explanation objectives (names: :data:`dpcam.names.OBJECTIVES`);
:func:`explanation_quality` scores one model on up to ``max_images`` images, in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dpcam.config import ExplainConfig
from dpcam.errors import UserError
from dpcam.registry import Registry

DIRECTIONS = ("minimize", "maximize", "maximize")


@dataclass(frozen=True)
class Objective:
    """An explanation-quality objective: the mean of ``key`` from registered metric ``metric``.

    Every objective is maximised: for a lower-is-better metric the value is ``complement − mean``
    (100 − Average Drop %, 1 − deletion AUC), so 0 is the worst value of every objective.
    """

    name: str
    metric: str  # name in dpcam.explain.metrics.METRICS
    key: str  # per-image key whose mean is the metric
    complement: float | None = None
    needs_masks: bool = False

    @property
    def label(self) -> str:
        """The objective's name in tables and plots, e.g. ``100 - avg_drop_pct``."""
        return f"{self.complement:g} - {self.key}" if self.complement is not None else self.key

    def value(self, mean: float) -> float:
        """The maximised value of a metric mean."""
        return self.complement - mean if self.complement is not None else mean

    worst: float = 0.0


OBJECTIVES: Registry[Objective] = Registry(
    "objective",
    (
        Objective("masked_score_pct", "confidence", "masked_score_pct"),
        Objective("avg_drop_pct", "confidence", "avg_drop_pct", complement=100.0),
        Objective("increase_conf_pct", "confidence", "increase_conf_pct"),
        Objective("masked_accuracy_pct", "confidence", "masked_accuracy_pct"),
        Objective("insertion_auc", "deletion-insertion", "insertion_auc"),
        Objective("deletion_auc", "deletion-insertion", "deletion_auc", complement=1.0),
        Objective("pointing_game", "pointing-game", "pointing_game", needs_masks=True),
        Objective("energy_pointing_game", "energy-pointing-game", "energy_pointing_game", needs_masks=True),
    ),
)


def objective_names(objective: Objective) -> list[str]:
    """The study's three objective names, in the order of :data:`DIRECTIONS`."""
    return ["epsilon", "val_accuracy", objective.label]


def explanation_quality(
    model,
    split,
    num_classes: int,
    objective: Objective,
    explain: ExplainConfig,
    max_images: int,
    device,
) -> dict[str, Any]:
    """Explanation objective of ``model`` on up to ``max_images`` images of ``split`` (means in memory, no files).

    ``split``: an :class:`dpcam.data.store.ImageDataset` (with masks for pointing objectives); the
    images are a fixed random subset (seed ``explain.seed``) so both classes appear. Maps follow
    ``explain`` (method, target, layer, steps, tolerance). Returns ``{"value": maximised objective,
    "mean": metric mean or None, "images": n, "degenerate": bool, "reasons": [...],
    "accuracy": accuracy on those images}``; a degenerate model (or one with no valid image for the
    metric) gets ``objective.worst``.
    """
    n = min(int(max_images), len(split))
    if n == 0:
        raise UserError(
            f"{split.ds.path}: the split used for explanations is empty; prepare the dataset with a validation split"
        )
    positions = np.sort(np.random.default_rng(explain.seed).permutation(len(split))[:n])
    sums, degeneracy = _score(model, split, positions, num_classes, objective, explain, device)
    mean = sums.result().get(objective.key)
    deg = degeneracy.result()
    reasons = list(deg["reasons"])
    if mean is None:
        reasons.append(f"no image with a valid {objective.key} among the {n} scored")
    value = objective.worst if reasons else float(objective.value(mean))
    return {
        "value": value,
        "mean": mean,
        "images": n,
        "degenerate": deg["degenerate"],
        "reasons": reasons,
        "accuracy": deg["accuracy"],
    }


def _score(model, split, positions: np.ndarray, num_classes: int, objective: Objective, explain: ExplainConfig, device):
    """The objective's metric and the degeneracy check over the images at ``positions``, batch by batch."""
    import torch

    from dpcam.explain.degeneracy import DegeneracyStats
    from dpcam.explain.gradcam import gradcam
    from dpcam.explain.methods import options_of
    from dpcam.explain.metrics import ExplainBatch, get_metrics
    from dpcam.explain.streaming import RunningMean

    (metric,) = get_metrics([objective.metric])
    options = {"deletion-insertion": {"steps": explain.steps}, "pointing-game": {"tolerance": explain.tolerance}}
    options = {k: v for k, v in options.get(metric.name, {}).items() if v is not None}
    how = {"layer": explain.layer, "method": explain.headline, "options": options_of(explain.headline, explain)}
    sums, degeneracy = RunningMean(), DegeneracyStats(num_classes)
    model.eval()
    for start in range(0, len(positions), explain.batch_size):
        batch = split.batch(positions[start : start + explain.batch_size])
        x, y = batch[0].to(device), batch[1].to(device)
        masks = batch[2].to(device) if len(batch) > 2 else None
        target = y if explain.target == "label" else None
        maps, target, probs = gradcam(model, x, target=target, **how)
        eb = ExplainBatch(model, x, maps, target, probs=probs, labels=y, masks=masks)
        with torch.no_grad():
            values, valid = metric(eb, **options)
        sums.add(values, valid)
        degeneracy.add(probs, y)
    return sums, degeneracy
