"""What every explanation-metric family reads, made the same way for all: the model's softmax, the maps
checked against their images and rounded to the saved precision, and each image's seeded random numbers.

Forward passes run under ``torch.no_grad`` in eval mode (the model's flags are restored afterwards) in
chunks of at most ``max_batch`` images.
"""

from __future__ import annotations

import torch
from torch import nn

from dpcam.explain.gradcam import evaluating

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
