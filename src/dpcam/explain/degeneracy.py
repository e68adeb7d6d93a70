"""The model-level degeneracy check: is a model near chance, one-class or input-insensitive, which fools the
paper's metrics? Streamed with :class:`DegeneracyStats` (O(num_classes) memory)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dpcam.errors import UserError

# Degenerate-model thresholds (see :func:`degenerate`).
CHANCE_MARGIN = 0.05  # near chance: accuracy <= chance + this (chance = best constant predictor)
MAJORITY_SHARE_MAX = 0.9  # one class for most predictions: majority share >= this (see degenerate)
INPUT_SENSITIVITY_MIN = 0.01  # input-insensitive: RMS distance of softmaxes from their mean < this


class DegeneracyStats:
    """Streaming inputs of :func:`degenerate`: O(num_classes) memory whatever the test-set size.

    ``add(probs (B, C), labels (B,))`` accumulates prediction and label histograms, the number
    correct, and float64 sums of the softmax and its square per class.
    """

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        c = int(num_classes)
        self.num_classes = c
        self.n = 0
        self.correct = 0
        self.pred_counts = torch.zeros(c, dtype=torch.long)
        self.label_counts = torch.zeros(c, dtype=torch.long)
        self.prob_sum = torch.zeros(c, dtype=torch.float64)
        self.prob_sq_sum = torch.zeros(c, dtype=torch.float64)

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> DegeneracyStats:
        p = probs.detach().double().cpu()
        y = labels.detach().long().reshape(-1).cpu()
        if p.dim() != 2 or p.shape[1] != self.num_classes or p.shape[0] != y.numel():
            raise ValueError(
                f"probs must be (B, {self.num_classes}) and labels (B,); got {tuple(p.shape)} and {tuple(y.shape)}"
            )
        pred = p.argmax(dim=1)
        self.n += int(y.numel())
        self.correct += int((pred == y).sum())
        self.pred_counts += torch.bincount(pred, minlength=self.num_classes)
        self.label_counts += torch.bincount(y.clamp(0, self.num_classes - 1), minlength=self.num_classes)
        self.prob_sum += p.sum(0)
        self.prob_sq_sum += p.square().sum(0)
        return self

    def result(self) -> dict[str, Any]:
        """The :func:`degenerate` dict for everything added so far."""
        if self.n == 0:
            raise UserError(
                "degeneracy check on 0 images: the test split is empty; prepare the dataset with a test split"
            )
        n, c = self.n, self.num_classes
        accuracy = self.correct / n
        chance = max(1.0 / c, float(self.label_counts.max()) / n)
        shares = self.pred_counts.double() / n
        majority_class = int(shares.argmax())
        majority_share = float(shares[majority_class])
        nz = shares[shares > 0]
        pred_entropy = float(-(nz * nz.log()).sum() / math.log(c))
        mean = self.prob_sum / n
        spread = (self.prob_sq_sum / n - mean.square()).clamp_min(0).sum()
        input_sensitivity = float(spread.sqrt())
        label_share = float(self.label_counts[majority_class]) / n
        majority_limit = max(MAJORITY_SHARE_MAX, label_share + CHANCE_MARGIN)

        reasons = []
        if accuracy <= chance + CHANCE_MARGIN:
            reasons.append(f"near chance: accuracy {accuracy:.3f} <= chance {chance:.3f} + {CHANCE_MARGIN}")
        if majority_share >= majority_limit:
            reasons.append(
                f"one class for most predictions: {majority_share:.1%} of predictions are class {majority_class} "
                f"(limit {majority_limit:.1%}; its share of labels {label_share:.1%})"
            )
        if input_sensitivity < INPUT_SENSITIVITY_MIN:
            reasons.append(
                f"input-insensitive: softmax outputs vary by {input_sensitivity:.4f} (RMS) across images "
                f"< {INPUT_SENSITIVITY_MIN}"
            )
        return {
            "n": n,
            "accuracy": accuracy,
            "chance": chance,
            "majority_class": majority_class,
            "majority_share": majority_share,
            "pred_entropy": pred_entropy,
            "pred_histogram": [int(v) for v in self.pred_counts],
            "input_sensitivity": input_sensitivity,
            "degenerate": bool(reasons),
            "reasons": reasons,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "n": self.n,
            "correct": self.correct,
            "pred_counts": self.pred_counts.clone(),
            "label_counts": self.label_counts.clone(),
            "prob_sum": self.prob_sum.clone(),
            "prob_sq_sum": self.prob_sq_sum.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(int(state["num_classes"]))
        self.n, self.correct = int(state["n"]), int(state["correct"])
        for k in ("pred_counts", "label_counts", "prob_sum", "prob_sq_sum"):
            setattr(self, k, torch.as_tensor(state[k]).clone().to(getattr(self, k).dtype))


def degenerate(probs: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """Model-level degeneracy flag from test-set softmax outputs ``(N, C)`` and true ``labels`` ``(N,)``.

    Degenerate models fool the paper's metrics (masking changes nothing: Average Drop ≈ 0,
    Increase ≈ 100%), so every explanation result carries this dict. Returns:

    - ``accuracy``; ``chance`` = the best constant predictor's accuracy,
      max(1/C, share of the most frequent label) (1/C alone flatters imbalanced data);
    - ``majority_class``, ``majority_share`` (share of predictions in the most predicted class),
      ``pred_histogram`` (counts per class), ``pred_entropy`` (entropy of the prediction
      histogram divided by log C: 0 = one class, 1 = uniform);
    - ``input_sensitivity`` = sqrt(mean_i ‖p(x_i) − p̄‖²), the RMS Euclidean distance of each
      image's softmax from the test-set mean softmax p̄ (computed exactly from streaming
      sums; chosen over a mean total-variation distance, which needs p̄ before the pass);
    - ``degenerate`` and ``reasons`` (one line each), flagged when any of:
      near chance, accuracy ≤ chance + :data:`CHANCE_MARGIN`;
      one class for most predictions, majority share ≥ max(:data:`MAJORITY_SHARE_MAX`, that
      class's share of the labels + :data:`CHANCE_MARGIN`) (so a healthy model on data that is
      itself 92% one class is not flagged for following the data);
      input-insensitive, ``input_sensitivity`` < :data:`INPUT_SENSITIVITY_MIN`.

    Stream large test sets with :class:`DegeneracyStats` (this function is one ``add``).
    """
    c = int(num_classes) if num_classes is not None else int(probs.shape[1])
    return DegeneracyStats(c).add(probs, labels).result()
