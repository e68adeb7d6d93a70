"""The Poisson plan of a DP-SGD run: the sampling rate and steps Opacus samples and accounts.

One function used by training (``engine.make_private`` checks Opacus built exactly this), search
(the tuning-cost worst case) and audit, so the mechanism that is accounted is the mechanism that ran.
Pure arithmetic: no torch, no Opacus.
"""

from __future__ import annotations

import math


def loader_batches(train_size: int, batch_size: int) -> int:
    """Batches per epoch of the plain DataLoader training builds (``batch_size`` capped at the set, last batch kept)."""
    return math.ceil(train_size / min(batch_size, train_size))


def poisson_plan(batches: int, epochs: int) -> tuple[float, int, int]:
    """(q, steps per epoch, planned steps) for a loader of ``batches`` batches, exactly as Opacus runs it.

    Opacus's DPDataLoader samples at q₀ = 1/batches and yields int(1/q₀) batches per epoch; its
    accountant hook counts each step at q = 1/len(DPDataLoader) = 1/int(1/q₀) (≥ q₀, conservative):
    for some loader lengths int(1/(1/L)) is L − 1 in floating point.
    """
    q0 = 1 / batches
    steps_per_epoch = int(1 / q0)
    return 1 / steps_per_epoch, steps_per_epoch, epochs * steps_per_epoch


def training_plan(train_size: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps) of a DP run on ``train_size`` images at expected batch ``batch_size`` for ``epochs`` epochs."""
    q, _, steps = poisson_plan(loader_batches(train_size, batch_size), epochs)
    return q, steps
