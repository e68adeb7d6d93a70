"""Means over a test set of any size, streamed batch by batch: exact running sums and counts per key
(O(#keys) memory), so a mean does not depend on the batch size or the order of the images."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


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
