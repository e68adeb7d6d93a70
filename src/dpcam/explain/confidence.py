"""The paper's confidence metrics (Average Drop, Increase in Confidence, masked score and accuracy) per image,
and what they give without an informative map (the masking baselines of the matched comparisons)."""

from __future__ import annotations

import torch
from torch import nn

from dpcam.explain.inputs import STREAM_RANDOM_MAP, _check_maps, _forward_probs, _target_prob, seeded_generator

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
