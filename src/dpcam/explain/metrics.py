"""Explanation metrics (docs/metrics.md) as pure, batched tensor functions, plus streaming helpers.

Shapes (every function accepts tensors on any device; results live on ``x``'s / ``maps``' device):

- ``x``: float ``(B, C, H, W)`` pixel-space images in [0, 1] (dpcam models normalise internally);
- ``maps``: float ``(B, H, W)`` explanation maps in [0, 1] (:func:`dpcam.explain.gradcam.gradcam`);
- ``target``: long ``(B,)`` the class explained (c); ``labels``: long ``(B,)`` the true classes;
- ``probs``: optional float ``(B, num_classes)`` softmax on ``x`` from the Grad-CAM pass, which
  saves the metrics a forward pass over ``x``;
- ``masks``: float or bool ``(B, H, W)``, 1 on lesion pixels;
- ``indices``: long ``(B,)`` the images' indices in their dataset, which seed each image's random
  numbers (the random maps of :func:`masking_baselines`, ROAD's noise), so reruns and other batch
  sizes draw the same numbers for the same image.

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
from dpcam.registry import Registry

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


# ------------------------------------------------------------- masking baselines (matched comparisons)

# Streams of per-image random numbers (:func:`seeded_generator`): one per use, so that no two share numbers.
STREAM_RANDOM_MAP = 1  # the random map's permutation of pixels (masking baselines)
STREAM_ROAD_ORDER = 2  # ROAD's tie-break order of pixels (one per image size, the same for every image)
STREAM_ROAD_NOISE = 3  # ROAD's imputation noise


def seeded_generator(seed: int, stream: int, *words: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream, *words)`` (e.g. the image's dataset index).

    numpy's ``SeedSequence`` hashes the words into the generator's seed, so nearby seeds and indices give
    unrelated numbers, and the same words give the same numbers on every run and machine (the numbers are
    drawn on the CPU and moved to the device afterwards).
    """
    import numpy as np

    entropy = [int(seed) % 2**64, int(stream), *(int(w) % 2**64 for w in words)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def random_maps(maps: torch.Tensor, indices: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each map's pixels in a random order: ``(B, H, W)`` → ``(B, H, W)``, the same values (and so the same
    mass, mean and histogram) placed at random positions.

    Image i's permutation comes from :func:`seeded_generator` ``(seed, STREAM_RANDOM_MAP, indices[i])``, so it
    depends on the seed and the image's dataset index alone: the same on every rerun, whatever the batch.
    """
    b, h, w = maps.shape
    if indices.numel() != b:
        raise ValueError(f"indices must have one entry per map ({b}); got {indices.numel()}")
    flat = maps.flatten(1)
    perm = torch.stack(
        [torch.randperm(h * w, generator=seeded_generator(seed, STREAM_RANDOM_MAP, int(i))) for i in indices.tolist()]
    ).to(maps.device)
    return flat.gather(1, perm).reshape(maps.shape)


def masking_baselines(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    indices: torch.Tensor,
    seed: int = 0,
    *,
    probs: torch.Tensor | None = None,
    max_batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """What the paper's metrics give without an informative map, per image (docs/metrics.md).

    - ``mask_sensitivity_pct`` = 100 · max(0, Y − O_u) / Y with O_u = p(c | x · m̄), m̄ the map's mean
      over pixels: :func:`confidence_drop`'s Average Drop for the constant map of the same mass. How much
      the model loses when the image is dimmed as much as the map dims it on average, whatever the map shows.
    - ``avg_drop_random_pct``, ``increase_conf_random_pct``, ``masked_score_random_pct``: Average Drop,
      Increase in Confidence and masked score (:func:`confidence_drop`, the same formulas) with the map's
      pixels permuted at random (:func:`random_maps`: seeded by ``seed`` and the image's dataset index).

    Also returns ``Y``, ``O_uniform`` and ``O_random``. Two forward passes (x · m̄ and x ⊙ random map).
    """
    maps = _check_maps(x, maps)
    target = target.to(x.device).long().reshape(-1)
    if probs is None:
        probs = _forward_probs(model, x, max_batch)
    mean = maps.double().mean(dim=(1, 2)).to(maps.dtype)
    uniform = confidence_drop(model, x, mean[:, None, None].expand_as(maps), target, probs=probs, max_batch=max_batch)
    shuffled = confidence_drop(
        model, x, random_maps(maps, indices.reshape(-1), seed), target, probs=probs, max_batch=max_batch
    )
    return {
        "Y": uniform["Y"],
        "O_uniform": uniform["O"],
        "O_random": shuffled["O"],
        "mask_sensitivity_pct": uniform["avg_drop_pct"],
        "avg_drop_random_pct": shuffled["avg_drop_pct"],
        "increase_conf_random_pct": shuffled["increase_conf_pct"],
        "masked_score_random_pct": shuffled["masked_score_pct"],
    }


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


# ------------------------------------------------------------------- ROAD (Rong et al. 2022)

# Removal fractions in percent: the midpoints of five equal bins of [0, 1], so the mean of a curve over
# them is its area by the midpoint rule; symmetric, so that MoRF at p and LeRF at 1 − p remove complementary sets.
ROAD_PERCENTS = (10, 30, 50, 70, 90)
ROAD_NOISE = 0.01  # σ of the imputation noise in pixel units ([0, 1]): the authors' default (NoisyLinearImputer)
# Noisy linear imputation's neighbour weights (Rong et al.; the authors' imputations.py): 1/6 for the four
# direct neighbours, 1/12 for the four diagonal ones (they sum to 1). (row offset, column offset, weight).
ROAD_NEIGHBOURS = (
    (0, 1, 1 / 6),
    (1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (1, 1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, 1, 1 / 12),
    (-1, 0, 1 / 6),
    (-1, -1, 1 / 12),
)
BAND_MAX_WIDTH = 128  # images up to this width are solved as banded systems (faster there), wider ones by sparse LU


def linear_impute(x: torch.Tensor, removed: torch.Tensor, *, solver: str = "auto") -> torch.Tensor:
    """ROAD's linear imputation (without noise): image ``x`` with the pixels where ``removed`` is True
    replaced, in every channel, by the solution of

        v_p = Σ_q w_q · v_q / Σ_q w_q     for every removed pixel p,

    the sums over p's neighbours q inside the image (weights :data:`ROAD_NEIGHBOURS`), where v_q = x_q for a
    kept pixel and the unknown v_q for a removed one: each removed pixel is the weighted mean of its
    neighbours, the discrete harmonic interpolation of the kept pixels (Rong et al. 2022; the authors'
    ``NoisyLinearImputer`` without its noise). With A = diag(Σ_q w_q) − (w between removed neighbours),
    symmetric positive definite when a pixel is kept, the system is A v = (w-weighted sums of kept
    neighbours); dpcam solves it for the correction e = v − x_removed, A e = −(L x)_removed, where L x is
    the image's graph Laplacian (Σ_q w_q (x_p − x_q)) — the same system, with a right-hand side computed once
    per image. Solved exactly (Cholesky, float64), one image's masks together (their systems are independent):

    - ``solver="band"``: removed pixels numbered in raster order couple only within W + 1 of each
      other, so each system is banded (LAPACK ``pbsv``, about n · (W + 1)² operations for n
      unknowns): fastest for small images;
    - ``solver="sparse"``: SuperLU (``scipy.sparse.linalg.splu``, the authors' solver, in its symmetric mode);
    - ``"auto"``: band up to :data:`BAND_MAX_WIDTH` pixels wide, sparse above.

    Args:
        x: ``(B, C, H, W)``.
        removed: bool ``(B, H, W)``, or ``(B, R, H, W)`` for R masks of each image.

    Returns:
        float32 ``(B, C, H, W)``, or ``(B, R, C, H, W)``, on ``x``'s device. An image's imputation does
        not depend on the other images of the batch. ValueError when a mask removes every pixel.
    """
    import numpy as np
    import scipy.sparse
    import scipy.sparse.linalg
    from scipy.linalg.lapack import dpbsv

    one = removed.dim() == 3
    rem = removed[:, None] if one else removed
    if x.dim() != 4 or rem.dim() != 4 or rem.shape[0] != x.shape[0] or rem.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"x must be (B, C, H, W) and removed (B, H, W) or (B, R, H, W); got {tuple(x.shape)}, "
            f"{tuple(removed.shape)}"
        )
    if solver not in ("auto", "band", "sparse"):
        raise ValueError(f"unknown solver {solver!r}: auto, band or sparse")
    b, c, h, w = x.shape
    r, n_pix = rem.shape[1], h * w
    flat = rem.detach().reshape(b, r, n_pix).bool().cpu()
    if bool((flat.sum(2) == n_pix).any()):
        raise ValueError("linear imputation needs a kept pixel in every mask; one removes every pixel")
    xs = x.detach().double().cpu().reshape(b, c, n_pix)
    out = xs.float().transpose(1, 2)[:, None].repeat(1, r, 1, 1)  # (B, R, H·W, C)
    per_image = flat.reshape(b, -1).sum(1)
    if int(per_image.sum()):
        cols = torch.arange(n_pix) % w
        diag_full = torch.zeros(n_pix, dtype=torch.float64)
        lap = torch.zeros_like(xs)  # L x: Σ_q w_q (x_p − x_q) over p's neighbours q inside the image
        local = flat.reshape(b, -1).int().cumsum(1).reshape(b, r, n_pix)  # 1 + the unknown's number in its image
        pairs = []  # per forward neighbour: bool (B, R, P) removed pairs, their band offset and column, the weight
        for dr, dc, weight in ROAD_NEIGHBOURS:
            d = dr * w + dc  # pixel p's neighbour is p + d in raster order, when inside the image:
            lo, hi = max(0, -d), n_pix - max(0, d)  # p + d in 0 .. H·W − 1 ...
            ok = (cols[lo:hi] + dc >= 0) & (cols[lo:hi] + dc < w)  # ... and not across the image's edge
            wt = weight * ok.double()  # float64 (a Python float times a bool tensor would be float32)
            diag_full[lo:hi] += wt
            lap[:, :, lo:hi] += wt * (xs[:, :, lo:hi] - xs[:, :, lo + d : hi + d])
            if d > 0:  # each pair of removed neighbours once, from its first pixel in raster order
                both = flat[:, :, lo:hi] & flat[:, :, lo + d : hi + d] & ok
                band = (local[:, :, lo + d : hi + d] - local[:, :, lo:hi])[both]
                pairs.append((both.reshape(b, -1).sum(1), band.numpy(), (local[:, :, lo:hi] - 1)[both].numpy(), weight))
        where = torch.nonzero(flat.reshape(-1)).squeeze(1)  # the unknowns: image, then mask, then raster order
        image, pixel = where // (r * n_pix), where % n_pix
        rows = image * n_pix + pixel  # the unknown's pixel in the (B·H·W, C) image rows
        rhs = -lap.transpose(1, 2).reshape(-1, c).index_select(0, rows).numpy()
        diag = diag_full[pixel].numpy()
        ends = per_image.cumsum(0).tolist()
        spans = [[0, *p[0].cumsum(0).tolist()] for p in pairs]  # image k's pairs: spans[o][k]:spans[o][k + 1]
        use_band = solver == "band" or (solver == "auto" and w <= BAND_MAX_WIDTH)
        e = np.empty_like(rhs)
        for k, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
            if hi == lo:
                continue
            parts = [(p[1][sp[k] : sp[k + 1]], p[2][sp[k] : sp[k + 1]], p[3]) for p, sp in zip(pairs, spans)]
            if use_band:
                kd = max((int(o.max()) for o, _, _ in parts if o.size), default=0)
                ab = np.zeros((kd + 1, hi - lo), order="F")
                ab[0] = diag[lo:hi]
                for o, col, weight in parts:
                    ab[o, col] = -weight
                _, e[lo:hi], info = dpbsv(ab, rhs[lo:hi], lower=1, overwrite_ab=1)
                if info:
                    raise ValueError(f"linear imputation: the system of image {k} is not positive definite ({info})")
            else:
                i = np.concatenate([col for _, col, _ in parts])
                j = i + np.concatenate([o for o, _, _ in parts])
                v = np.concatenate([np.full(col.size, -weight) for _, col, weight in parts])
                m = np.arange(hi - lo)
                a = scipy.sparse.csc_matrix(
                    (np.concatenate([diag[lo:hi], v, v]), (np.concatenate([m, i, j]), np.concatenate([m, j, i]))),
                    shape=(hi - lo, hi - lo),
                )
                # symmetric ordering and diagonal pivots (A is SPD): about 20 % faster than the default at 224 px
                lu = scipy.sparse.linalg.splu(a, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
                e[lo:hi] = lu.solve(np.ascontiguousarray(rhs[lo:hi]))
        known = xs.transpose(1, 2).reshape(-1, c).index_select(0, rows)
        out.view(-1, c).index_copy_(0, where, (known + torch.from_numpy(e)).float())
    out = out.transpose(2, 3).reshape(b, r, c, h, w).to(x.device)
    return out[:, 0] if one else out


def road_ranks(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of each pixel by decreasing map value for ROAD: ``(B, H, W)`` → long ``(B, H, W)``, 0 = most relevant.

    Ties (a Grad-CAM map's plateau of zeros) are broken by a fixed random order of the pixels, the same
    for every image (:func:`seeded_generator` ``(seed, STREAM_ROAD_ORDER, H, W)``), as the authors' code
    breaks them by a fixed small random perturbation; raster order (:func:`saliency_ranks`) would remove a
    plateau row by row and hand the imputation whole missing rows.
    """
    b, h, w = maps.shape
    tie = torch.randperm(h * w, generator=seeded_generator(seed, STREAM_ROAD_ORDER, h, w)).to(maps.device)
    flat = maps.flatten(1)[:, tie]
    order = tie[torch.argsort(flat, dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=maps.device).expand_as(order))
    return ranks.reshape(maps.shape)


def _mean_rows(curve: torch.Tensor) -> torch.Tensor:
    """Mean of ``(F, B)`` curves over F in float64, point by point in a fixed order → float64 ``(B,)``."""
    c = curve.double()
    acc = torch.zeros_like(c[0])
    for k in range(c.shape[0]):
        acc = acc + c[k]
    return acc / c.shape[0]


def road(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    indices: torch.Tensor,
    seed: int = 0,
    *,
    percents: Sequence[int] = ROAD_PERCENTS,
    noise: float = ROAD_NOISE,
    max_batch: int | None = None,
    solver: str = "auto",
    return_curves: bool = False,
) -> dict[str, torch.Tensor]:
    """ROAD, remove and debias (Rong et al. 2022), per image: MoRF and LeRF curves of p(c | imputed image).

    For each fraction p of :data:`ROAD_PERCENTS`, the k = ⌊p · H·W / 100⌋ most relevant pixels (MoRF) or
    the k least relevant (LeRF) by :func:`road_ranks` are removed and imputed (:func:`linear_impute`) plus
    Gaussian noise of σ = ``noise`` on every imputed value (drawn from :func:`seeded_generator`
    ``(seed, STREAM_ROAD_NOISE, indices[i])``: the same for an image on every rerun, whatever the batch). The
    model is not retrained (ROAD's point: the imputation removes the information the mask's shape would
    leak). Each curve is p(c | imputed image) at the fractions; its area is its mean over them (the
    midpoint rule on [0, 1] for the default fractions).

    Returns float32 ``(B,)`` tensors:

    - ``road_morf_auc`` (lower is better: removing what the map calls relevant should hurt);
    - ``road_lerf_auc`` (higher is better: removing what it calls irrelevant should not);
    - ``road_gap`` = LeRF − MoRF (higher is better);

    and with ``return_curves`` also ``morf_curve`` and ``lerf_curve``, float32 ``(F, B)``. Cost: 2F forwards
    of the batch (10 by default), in chunks of whole fractions of at most ``max_batch`` images (None: B),
    and 2F·B linear systems of up to H·W unknowns.
    """
    maps = _check_maps(x, maps)
    target = target.to(x.device).long().reshape(-1)
    idx = indices.reshape(-1).tolist()
    b, c, h, w = x.shape
    if len(idx) != b:
        raise ValueError(f"indices must have one entry per image ({b}); got {len(idx)}")
    pct = [int(p) for p in percents]
    if not pct or any(not 0 < p < 100 for p in pct):
        raise UserError(f"ROAD removal percentages must lie in (0, 100); got {list(percents)}")
    f = len(pct)
    ranks = road_ranks(maps, seed)
    ks = [p * h * w // 100 for p in pct]
    removed = torch.stack([ranks < k for k in ks] + [ranks >= h * w - k for k in ks], dim=1)  # (B, 2F, H, W)
    imputed = linear_impute(x, removed, solver=solver)  # (B, 2F, C, H, W)
    if noise:
        gens = [seeded_generator(seed, STREAM_ROAD_NOISE, i) for i in idx]
        z = torch.stack([torch.randn(2 * f, c, h, w, generator=g) for g in gens])
        imputed = torch.where(removed[:, :, None], imputed + float(noise) * z.to(x.device), imputed)
    jobs = imputed.transpose(0, 1)  # (2F, B, C, H, W): job j is fraction j of every image
    per_chunk = max(1, (max_batch or b) // max(b, 1))
    curves = torch.empty(2 * f, b, device=x.device)
    with evaluating(model), torch.no_grad():
        for j in range(0, 2 * f, per_chunk):
            part = jobs[j : j + per_chunk]
            n_jobs = part.shape[0]
            p = torch.softmax(model(part.reshape(-1, c, h, w).to(x.dtype)).float(), dim=1).view(n_jobs, b, -1)
            curves[j : j + n_jobs] = p.gather(2, target.view(1, b, 1).expand(n_jobs, b, 1)).squeeze(2)
    morf, lerf = _mean_rows(curves[:f]), _mean_rows(curves[f:])
    out = {"road_morf_auc": morf.float(), "road_lerf_auc": lerf.float(), "road_gap": (lerf - morf).float()}
    if return_curves:
        out |= {"morf_curve": curves[:f], "lerf_curve": curves[f:]}
    return out


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
