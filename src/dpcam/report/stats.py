"""Statistics over seeds: the mean and its Student-t confidence interval, and a table cell of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and the Student-t half-width of its ``level`` confidence interval over ``values`` (seeds).

    Half-width = t_{(1+level)/2, n-1} · s / √n with s the sample standard deviation (ddof = 1);
    None when n < 2. Mean None when ``values`` is empty.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, half


def format_cell(values: Sequence[float], decimals: int) -> str:
    """``"0.600 ± 1.271"`` (n ≥ 2), ``"0.600"`` (n = 1) or ``"—"`` (no value)."""
    mean, half = mean_ci(values)
    if mean is None:
        return "—"
    return f"{mean:.{decimals}f}" + (f" ± {half:.{decimals}f}" if half is not None else "")
