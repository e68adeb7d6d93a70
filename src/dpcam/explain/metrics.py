"""Explanation metrics (docs/metrics.md) as pure, batched tensor functions, plus streaming helpers.

Shapes (every function accepts tensors on any device; results live on ``x``'s / ``maps``' device):

- ``x``: float ``(B, C, H, W)`` pixel-space images in [0, 1] (dpcam models normalise internally);
- ``maps``: float ``(B, H, W)`` explanation maps in [0, 1] (:func:`dpcam.explain.gradcam.gradcam`);
- ``target``: long ``(B,)`` the class explained (c); ``labels``: long ``(B,)`` the true classes;
- ``probs``: optional float ``(B, num_classes)`` softmax on ``x`` from the Grad-CAM pass, which
  saves the metrics a forward pass over ``x``;
- ``masks``: float or bool ``(B, H, W)``, 1 on lesion pixels.

Per-image functions return ``(B,)`` tensors; means over a test set of any size are streamed with
:class:`RunningMean` (exact running sums and counts per key, O(#keys) memory), and the
model-level degeneracy flag with :class:`DegeneracyStats` (O(num_classes) memory). Forward passes
run under ``torch.no_grad`` in eval mode (the model's flags are restored afterwards) in chunks of
at most ``max_batch`` images.

The registry :data:`METRICS` names every per-image metric with a uniform entry point
(``METRICS[name](ExplainBatch(...), **options) -> (values, valid)``) so a streaming scorer can pick
metrics by name from params, skip those whose inputs are missing (e.g. masks) with a note, and feed
the results straight into a :class:`RunningMean`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpcam.errors import UserError
from dpcam.explain.gradcam import evaluating

# Degenerate-model thresholds (see :func:`degenerate`).
CHANCE_MARGIN = 0.05  # near chance: accuracy <= chance + this (chance = best constant predictor)
MAJORITY_SHARE_MAX = 0.9  # one class for most predictions: majority share >= this (see degenerate)
INPUT_SENSITIVITY_MIN = 0.01  # input-insensitive: RMS distance of softmaxes from their mean < this

# Deletion / insertion defaults (Petsiuk et al. 2018; RISE's blur is an 11x11 Gaussian, sigma 5).
DEFAULT_STEPS = 16
DEFAULT_BLUR_SIGMA = 5.0
DEFAULT_BLUR_KERNEL = 11

# Pointing game: Zhang et al. (2016) use a 15 px tolerance on 224 px images; scaled to the image.
POINTING_TOLERANCE_AT_224 = 15


# ------------------------------------------------------------------------------------- helpers


# The dtype of the saved maps (maps.npy). The explain stage rounds every map to it before any metric
# sees it (:func:`as_saved`), so each explain.json number is recomputable from the saved file exactly.
SAVED_MAP_DTYPE = torch.float16


def as_saved(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` rounded to :data:`SAVED_MAP_DTYPE` (round to nearest even), as float32: what maps.npy holds.

    Maps in [0, 1] lose nothing but precision (float16 spacing ≤ 2⁻¹¹ on [0.5, 1], so pixels within
    2.4e-4 of the maximum 1 become ties of it); 0 and 1 stay exact.
    """
    return maps.to(SAVED_MAP_DTYPE).to(torch.float32)


def _forward_probs(model: nn.Module, x: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """Softmax of ``model`` on ``x`` ``(N, C, H, W)`` → float32 ``(N, num_classes)``; no grad, eval mode, chunked."""
    n = x.shape[0]
    step = n if not max_batch or max_batch >= n else int(max_batch)
    out = []
    with evaluating(model), torch.no_grad():
        for i in range(0, n, max(step, 1)):
            out.append(torch.softmax(model(x[i : i + step]).float(), dim=1))
    return torch.cat(out) if out else x.new_zeros((0, 0))


def predict_probs(model: nn.Module, x: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """Softmax probabilities of ``model`` on pixel-space ``x`` ``(B, C, H, W)``: float32 ``(B, num_classes)``.

    No grad, eval mode (restored afterwards), at most ``max_batch`` images per forward (None: all).
    """
    return _forward_probs(model, x, max_batch)


def _check_maps(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    if maps.dim() != 3 or maps.shape[0] != x.shape[0] or tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(f"maps must have shape (B, H, W) = {(x.shape[0], *x.shape[-2:])}; got {tuple(maps.shape)}")
    return maps.to(device=x.device, dtype=x.dtype)


def _target_prob(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``probs[i, target[i]]``: ``(B, C)``, ``(B,)`` → ``(B,)``."""
    return probs.gather(1, target.to(probs.device).long().reshape(-1, 1)).squeeze(1)


def masked_input(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """x̃ = x ⊙ L(x) in pixel space (0 = black): ``(B, C, H, W)`` ⊙ ``(B, H, W)`` → ``(B, C, H, W)``."""
    return x * _check_maps(x, maps)[:, None]


# ------------------------------------------------------------------------- confidence (paper)


def confidence_drop(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    probs: torch.Tensor | None = None,
    max_batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """Average Drop, Increase in Confidence, masked score and masked accuracy, per image.

    Y_i = p(c_i | x_i) and O_i = p(c_i | x̃_i) with x̃ = x ⊙ L(x) in pixel space (docs/metrics.md;
    Chattopadhay et al. 2018, Grad-CAM++, eqs. 20–21). ``probs`` (softmax on ``x``, ``(B, C)``)
    gives Y without a forward pass; otherwise ``x`` is run through the model too.

    Returns float32 ``(B,)`` tensors whose **means** are the paper's percentages:

    - ``Y``, ``O``: the two probabilities;
    - ``avg_drop_pct`` = 100 · max(0, Y − O) / Y (0 where Y = 0, where Y − O ≤ 0 anyway);
    - ``increase_conf_pct`` = 100 · 1[O > Y] (strict: O == Y, e.g. a model that ignores its
      input, is no increase);
    - ``masked_score_pct`` = 100 · O (the paper's "average normalised input score");
    - ``masked_accuracy_pct`` = 100 · 1[argmax p(· | x̃) == label] (only when ``labels`` given).
    """
    maps = _check_maps(x, maps)
    target = target.to(x.device).long().reshape(-1)
    if probs is None:
        probs = _forward_probs(model, x, max_batch)
    y = _target_prob(probs.to(x.device).float(), target)
    masked_probs = _forward_probs(model, x * maps[:, None], max_batch)
    o = _target_prob(masked_probs, target)
    drop = torch.where(y > 0, (y - o).clamp_min(0) / torch.where(y > 0, y, torch.ones_like(y)), torch.zeros_like(y))
    out = {
        "Y": y,
        "O": o,
        "avg_drop_pct": 100.0 * drop,
        "increase_conf_pct": 100.0 * (o > y).float(),
        "masked_score_pct": 100.0 * o,
    }
    if labels is not None:
        out["masked_accuracy_pct"] = (
            100.0 * (masked_probs.argmax(dim=1) == labels.to(x.device).long().reshape(-1)).float()
        )
    return out


# -------------------------------------------------------------------- deletion / insertion (RISE)


def blur_baseline(
    x: torch.Tensor, sigma: float = DEFAULT_BLUR_SIGMA, kernel_size: int = DEFAULT_BLUR_KERNEL
) -> torch.Tensor:
    """Gaussian blur of ``x`` ``(B, C, H, W)`` with reflect padding; same shape.

    torchvision's ``gaussian_blur`` (same kernel, padding and depthwise convolution; the tests pin
    it to torchvision's output) in three torch calls, because importing torchvision costs every
    explain process about 2.5 s. The kernel is made odd and shrunk to fit the image (reflect
    padding needs kernel // 2 < H, W).
    """
    if sigma <= 0:
        raise UserError(f"blur sigma {sigma} must be > 0 (deletion/insertion baseline)")
    k = int(kernel_size) | 1  # odd
    k = max(1, min(k, 2 * (min(x.shape[-2:]) - 1) + 1))
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=x.dtype, device=x.device)
    pdf = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    k1 = pdf / pdf.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])


def saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel by decreasing saliency: ``(B, H, W)`` → long ``(B, H, W)``, 0 = most salient.

    Ties are broken by raster order (stable sort), so a constant map ranks pixels row by row.
    """
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.reshape(maps.shape)


def _trapezoid(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of ``(K + 1, B)`` curves over [0, 1] → float32 ``(B,)``, summed in float64 in a fixed order
    (step by step), so an image's AUC does not depend on how many images share the batch."""
    c = curve.double()
    acc = torch.zeros_like(c[0])
    for k in range(c.shape[0] - 1):
        acc = acc + (c[k] + c[k + 1])
    return (acc / (2 * (c.shape[0] - 1))).float()


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    *,
    blur_kernel: int = DEFAULT_BLUR_KERNEL,
    baseline: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    max_batch: int | None = None,
    return_curves: bool = False,
):
    """Deletion and insertion AUC (Petsiuk et al. 2018, RISE), batched over steps.

    Pixels are ranked by decreasing ``maps`` (:func:`saliency_ranks`). At step k = 0..K the
    ``round(k · H·W / K)`` most salient pixels (all channels) are switched: *deletion* replaces
    them in ``x`` by the ``baseline``; *insertion* starts from the baseline and restores them
    from ``x``. The curve is p(c | image_k) over the fraction k / K ∈ [0, 1] (K + 1 points) and
    the AUC is its trapezoid area, in [0, 1]. Lower deletion / higher insertion is better.

    Departures from RISE: removed pixels become the **blurred** image for deletion too
    (docs/metrics.md; RISE deletes to black), the blur is torchvision's (reflect padding; RISE zero-pads), and
    the curve has K + 1 points at equal fractions rather than a fixed pixel count per step.

    Cost: the K − 1 interior steps of both curves are forwarded as one stack of 2(K − 1)·B
    images, built chunk by chunk (at most ``max_batch`` images per forward, rounded down to whole
    steps; None → B, the caller's batch size, which measured fastest on CPU — on a GPU a larger
    ``max_batch`` amortises launches); the end points reuse p(c | x) (from ``probs`` when given)
    and one forward of the baseline: 2K − 1 forwards of B images in all (31 at K = 16).

    Args:
        x, maps, target: ``(B, C, H, W)``, ``(B, H, W)``, ``(B,)``.
        steps: K ≥ 2.
        blur_sigma, blur_kernel: the Gaussian blur making the baseline (:func:`blur_baseline`).
        baseline: ``(B, C, H, W)`` replacement image instead of the blur (e.g. zeros for RISE's
            deletion).
        probs: ``(B, num_classes)`` softmax on ``x``, if known.
        return_curves: also return the curves, float32 ``(K + 1, B)`` each.

    Returns:
        ``(deletion_auc, insertion_auc)``, float32 ``(B,)`` each, and with ``return_curves``
        also ``(deletion_curve, insertion_curve)``.
    """
    k_steps = int(steps)
    if k_steps < 2:
        raise UserError(f"deletion/insertion steps K = {steps}: give K >= 2 (default {DEFAULT_STEPS})")
    maps = _check_maps(x, maps)
    target = target.to(x.device).long().reshape(-1)
    b, n_pix = x.shape[0], x.shape[-2] * x.shape[-1]
    base = blur_baseline(x, blur_sigma, blur_kernel) if baseline is None else baseline.to(x.device, x.dtype)
    if base.shape != x.shape:
        raise ValueError(f"baseline must have the shape of x {tuple(x.shape)}; got {tuple(base.shape)}")
    ranks = saliency_ranks(maps)[:, None]  # (B, 1, H, W)
    counts = torch.round(torch.arange(k_steps + 1, dtype=torch.float64) * n_pix / k_steps).long().to(x.device)

    p_x = (
        _target_prob(probs.to(x.device).float(), target)
        if probs is not None
        else _target_prob(_forward_probs(model, x, max_batch), target)
    )
    p_base = _target_prob(_forward_probs(model, base, max_batch), target)

    # Interior jobs: (is_deletion, k) for k = 1..K-1 of both curves; each job is B images.
    ks = torch.arange(1, k_steps, device=x.device)
    job_k = torch.cat([ks, ks])
    job_del = torch.cat([torch.ones_like(ks, dtype=torch.bool), torch.zeros_like(ks, dtype=torch.bool)])
    per_chunk = max(1, (max_batch or b) // max(b, 1))
    interior = torch.empty(job_k.numel(), b, device=x.device)
    with evaluating(model), torch.no_grad():
        for j in range(0, job_k.numel(), per_chunk):
            m = counts[job_k[j : j + per_chunk]].view(-1, 1, 1, 1, 1)
            d = job_del[j : j + per_chunk].view(-1, 1, 1, 1, 1)
            keep = (ranks[None] < m) ^ d  # keep the original pixel: inserted ones / not yet deleted
            imgs = torch.where(keep, x[None], base[None]).flatten(0, 1)
            n_jobs = m.shape[0]
            p = torch.softmax(model(imgs).float(), dim=1).view(n_jobs, b, -1)
            interior[j : j + n_jobs] = p.gather(2, target.view(1, b, 1).expand(n_jobs, b, 1)).squeeze(2)
    n_in = k_steps - 1
    deletion = torch.cat([p_x[None], interior[:n_in], p_base[None]])
    insertion = torch.cat([p_base[None], interior[n_in:], p_x[None]])
    del_auc, ins_auc = _trapezoid(deletion), _trapezoid(insertion)
    if return_curves:
        return del_auc, ins_auc, deletion, insertion
    return del_auc, ins_auc


# ------------------------------------------------------------------------------ pointing games


def has_mask(masks: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` masks → bool ``(B,)``: True where the mask is non-empty (e.g. grade > 0)."""
    return (masks.flatten(1) > 0).any(dim=1)


def default_tolerance(height: int, width: int) -> int:
    """Zhang et al.'s 15 px at 224 px, scaled to the image: ``round(15 · min(H, W) / 224)``."""
    return int(round(POINTING_TOLERANCE_AT_224 * min(height, width) / 224))


def dilate_disc(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Bool ``(B, H, W)``: the pixels within Euclidean distance ≤ ``tolerance`` of a pixel > 0 of ``masks``.

    Exact for the pixel grid: (y, x) is in the dilation when some mask pixel (y', x') has
    (y − y')² + (x − x')² ≤ t². Computed as a union over row offsets |dy| ≤ t of the mask dilated
    along rows by ⌊√(t² − dy²)⌋ pixels (window sums of a cumulative sum), so the cost is O(t·H·W)
    elementwise operations rather than a (2t+1)² convolution.
    """
    m = masks > 0
    t = int(tolerance)
    if t <= 0:
        return m
    b, h, w = m.shape
    pre = torch.zeros(b, h, w + 1, dtype=torch.int32, device=m.device)
    pre[..., 1:] = m.to(torch.int32).cumsum(-1)
    cols = torch.arange(w, device=m.device)
    out = torch.zeros_like(m)
    for dy in range(min(t, h - 1) + 1):
        half = math.isqrt(t * t - dy * dy)
        hi, lo = (cols + half + 1).clamp(max=w), (cols - half).clamp(min=0)
        rows = (pre[..., hi] - pre[..., lo]) > 0  # dilated along rows by `half`
        out[:, dy:] |= rows[:, : h - dy]  # a mask pixel at row y' reaches rows y' ± dy
        if dy:
            out[:, : h - dy] |= rows[:, dy:]
    return out


def pointing_game(
    maps: torch.Tensor, masks: torch.Tensor, tolerance: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game (Zhang et al. 2016) on lesion masks (docs/metrics.md).

    A hit when **any** maximal pixel of the map (every pixel equal to the map's maximum: a
    bilinearly upsampled coarse map has flat maximum plateaus, and which plateau pixel comes
    first must not decide the hit) lies within Euclidean distance ``tolerance`` of a lesion pixel
    (:func:`dilate_disc`, Zhang et al.'s disc). A constant map (max = min, e.g. all zeros after the
    ReLU) points nowhere and is a **miss**, still counted when the mask is non-empty.

    Args:
        maps: ``(B, H, W)``; compared as given (the explain stage passes the float16-rounded maps
            it saves, so ties are ties at the saved precision).
        masks: ``(B, H, W)``, > 0 on lesion pixels.
        tolerance: pixels; None → :func:`default_tolerance`.

    Returns:
        ``hits`` float32 ``(B,)`` in {0, 1} (0 where not valid) and ``valid`` bool ``(B,)``
        (the mask is non-empty). The score is ``hits[valid].mean()``.
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (B, H, W)")
    h, w = maps.shape[-2:]
    t = default_tolerance(h, w) if tolerance is None else int(tolerance)
    if t < 0:
        raise UserError(f"pointing-game tolerance {tolerance} must be >= 0 pixels")
    flat = maps.flatten(1)
    lo, hi = flat.aminmax(dim=1)
    maximal = flat == hi[:, None]  # (B, H·W): every pixel of the maximum, ties included
    region = dilate_disc(masks.to(maps.device), t).flatten(1)
    valid = has_mask(masks).to(maps.device)
    hits = (maximal & region).any(dim=1) & (hi > lo) & valid
    return hits.float(), valid


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM; masks instead of boxes): ``(B,)`` float32.

    Σ L inside the mask / Σ L over the image, for ``maps`` and ``masks`` ``(B, H, W)`` (maps are
    non-negative Grad-CAM maps). 0 where Σ L = 0 (an all-zero map puts no energy anywhere);
    average only over images with :func:`has_mask`.
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (B, H, W)")
    flat = maps.flatten(1).float()
    inside = (flat * (masks.to(maps.device).flatten(1) > 0)).sum(1)
    total = flat.sum(1)
    return torch.where(
        total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total)
    )


# ------------------------------------------------------------------------------- map agreement


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim of ``(B, n)`` with ties given their average rank (as scipy); float64."""
    v = values.flatten(1)
    b, n = v.shape
    sorted_v, order = torch.sort(v, dim=1, stable=True)
    new_group = torch.ones_like(sorted_v, dtype=torch.long)
    new_group[:, 1:] = (sorted_v[:, 1:] != sorted_v[:, :-1]).long()
    group = new_group.cumsum(dim=1) - 1  # (B, n) group id in sorted order
    pos = torch.arange(1, n + 1, device=v.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b, n, device=v.device, dtype=torch.float64).scatter_add_(1, group, pos)
    cnts = torch.zeros(b, n, device=v.device, dtype=torch.float64).scatter_add_(1, group, torch.ones_like(pos))
    avg = (sums / cnts.clamp_min(1)).gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)


def map_agreement(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between two map batches ``(B, H, W)`` → float32 ``(B,)``.

    Pearson correlation of the pixels' average ranks (ties share their mean rank, as
    ``scipy.stats.spearmanr``; Grad-CAM maps have many tied zeros after the ReLU, and ordinal
    ranks would make those ties look like agreement). NaN where either map is constant (the
    correlation is undefined); skip those images when averaging.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"maps of shapes {tuple(maps_a.shape)} and {tuple(maps_b.shape)} cannot be compared")
    ra = average_ranks(maps_a)
    rb = average_ranks(maps_b.to(maps_a.device))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / den
    rho = torch.where(den > 0, rho.clamp(-1.0, 1.0), torch.full_like(rho, float("nan")))
    return rho.float()


# --------------------------------------------------------------------------------- streaming


def _add_exact(partials: list[float], x: float) -> None:
    """Add ``x`` to the non-overlapping float64 ``partials`` exactly (Shewchuk's algorithm, as ``math.fsum``)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class RunningMean:
    """Exact running float64 sums and counts per key over batches; :meth:`result` gives the means.

    ``add({"avg_drop_pct": (B,), ...}, valid=...)`` adds each key's values where ``valid`` (a bool
    ``(B,)`` tensor for all keys, or a mapping key → bool ``(B,)``; missing → all valid). The sums
    are exact (Shewchuk's partials, as ``math.fsum``) and rounded once in :meth:`result`, so a mean
    does not depend on the batch size or the order of the images: the same per-image values give
    the same bits. Memory is O(number of keys) whatever the test-set size (a handful of partials
    per key); :meth:`merge` combines workers' sums, and ``state_dict``/``load_state_dict`` let a
    scorer resume.
    """

    def __init__(self) -> None:
        self.partials: dict[str, list[float]] = {}
        self.counts: dict[str, int] = {}

    @property
    def sums(self) -> dict[str, float]:
        """The sum per key (correctly rounded to float64)."""
        return {k: math.fsum(p) for k, p in self.partials.items()}

    def add(
        self, values: Mapping[str, torch.Tensor], valid: Mapping[str, torch.Tensor] | torch.Tensor | None = None
    ) -> RunningMean:
        for key, v in values.items():
            v = v.detach().reshape(-1).double()
            ok = valid.get(key) if isinstance(valid, Mapping) else valid
            if ok is not None:
                v = v[ok.to(v.device).reshape(-1).bool()]
            partials = self.partials.setdefault(key, [])
            for x in v.cpu().tolist():
                _add_exact(partials, x)
            self.counts[key] = self.counts.get(key, 0) + int(v.numel())
        return self

    def merge(self, other: RunningMean) -> RunningMean:
        for key, p in other.partials.items():
            mine = self.partials.setdefault(key, [])
            for x in p:
                _add_exact(mine, x)
            self.counts[key] = self.counts.get(key, 0) + other.counts[key]
        return self

    def result(self) -> dict[str, float | None]:
        """Mean per key (None where no valid value was added)."""
        return {k: (math.fsum(p) / self.counts[k] if self.counts[k] else None) for k, p in self.partials.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"partials": {k: list(p) for k, p in self.partials.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "partials" in state:
            self.partials = {k: [float(x) for x in p] for k, p in state["partials"].items()}
        else:  # a plain sum per key
            self.partials = {k: [float(v)] for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}


def finalize(sums: Mapping[str, float], counts: Mapping[str, int]) -> dict[str, float | None]:
    """Means from running ``sums`` and ``counts`` per key (None where the count is 0).

    For :func:`confidence_drop`'s keys this gives the paper's Average Drop %, Increase in
    Confidence %, masked score % and masked accuracy %.
    """
    return {k: (float(sums[k]) / counts[k] if counts.get(k) else None) for k in sums}


# ------------------------------------------------------------------------------ degenerate model


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


# ---------------------------------------------------------------------------------- registry


@dataclass
class ExplainBatch:
    """What a scorer has for one batch; the registry's metrics read the fields they need.

    ``x`` ``(B, C, H, W)``, ``maps``/``reference_maps``/``random_maps``/``masks`` ``(B, H, W)``,
    ``target``/``labels`` ``(B,)``, ``probs`` ``(B, num_classes)`` (softmax on ``x``).
    ``reference_maps``: the non-private run's maps of the same images; ``random_maps``: the
    maps of :func:`dpcam.explain.gradcam.random_init_copy` of the model for the same targets.
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


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` under its name."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def get_metrics(names: Sequence[str]) -> list[Metric]:
    """The registered metrics named (in order); UserError listing the known names for an unknown one."""
    out = []
    for name in names:
        key = str(name).lower()
        if key not in METRICS:
            raise UserError(f"unknown explanation metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
        out.append(METRICS[key])
    return out


def _confidence(batch: ExplainBatch, max_batch: int | None = None):
    out = confidence_drop(
        batch.model, batch.x, batch.maps, batch.target, batch.labels, probs=batch.probs, max_batch=max_batch
    )
    values = {k: out[k] for k in ("avg_drop_pct", "increase_conf_pct", "masked_score_pct")}
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


def random_pointing(masks: torch.Tensor, tolerance: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pointing game of a random map: per image, the chance that a uniformly random pixel (the unique
    maximum of a map of i.i.d. continuous values) lands in the tolerance region, |region| / (H·W).

    Exact (no sampling): the baseline a model's pointing game must beat to say its maps point at lesions.
    Returns ``(rate, valid)`` like :func:`pointing_game`.
    """
    h, w = masks.shape[-2:]
    t = default_tolerance(h, w) if tolerance is None else int(tolerance)
    region = dilate_disc(masks, t).flatten(1).float()
    valid = has_mask(masks)
    return region.mean(dim=1) * valid, valid


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


register_metric(
    Metric(
        "confidence",
        _confidence,
        ("avg_drop_pct", "increase_conf_pct", "masked_score_pct", "masked_accuracy_pct"),
        options=("max_batch",),
        description="Average Drop %, Increase in Confidence %, masked score % and masked accuracy % (one forward of x̃)",
    )
)
register_metric(
    Metric(
        "deletion-insertion",
        _deletion_insertion,
        ("deletion_auc", "insertion_auc"),
        options=("steps", "blur_sigma", "blur_kernel", "max_batch"),
        description="RISE deletion and insertion AUC over K steps to/from the blurred image",
    )
)
register_metric(
    Metric(
        "pointing-game",
        _pointing,
        ("pointing_game", "pointing_game_random"),
        needs=("masks",),
        options=("tolerance",),
        description="share of maps with a maximal pixel within t px (a disc) of the lesion mask; lesion images only",
    )
)
register_metric(
    Metric(
        "energy-pointing-game",
        _energy,
        ("energy_pointing_game",),
        needs=("masks",),
        description="share of the map's energy inside the lesion mask; images with lesions only",
    )
)
register_metric(
    Metric(
        "map-agreement",
        _agreement,
        ("map_agreement",),
        needs=("reference_maps",),
        description="Spearman correlation with the non-private run's maps of the same images",
    )
)
register_metric(
    Metric(
        "randomisation",
        _randomisation,
        ("randomisation_agreement",),
        needs=("random_maps",),
        description="Spearman correlation with the maps of a re-initialised copy "
        "(Adebayo et al.; high = maps ignore the model)",
    )
)
