"""Faithfulness curves: what the model's confidence does as the pixels a map ranks are removed, by
deletion/insertion to a blurred image (RISE) and by ROAD's noisy linear imputation (its solver:
:mod:`dpcam.explain.imputation`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.explain.blur import DEFAULT_BLUR_KERNEL, DEFAULT_BLUR_SIGMA, blur_baseline
from dpcam.explain.gradcam import evaluating
from dpcam.explain.imputation import linear_impute
from dpcam.explain.inputs import (
    STREAM_ROAD_NOISE,
    STREAM_ROAD_ORDER,
    _check_maps,
    _forward_probs,
    _target_prob,
    seeded_generator,
)

# Deletion / insertion defaults (Petsiuk et al. 2018); the blurred image: dpcam.explain.blur.
DEFAULT_STEPS = 16


# -------------------------------------------------------------------- deletion / insertion (RISE)


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
