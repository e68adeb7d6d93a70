"""dp_accounting events of dpcam's mechanisms: the one place they are built.

A DP-SGD run is ``steps`` compositions of a Poisson-subsampled Gaussian (noise multiplier σ, L2
sensitivity 1 after clipping) or Laplace (λ, L1 sensitivity 1) step; a run's ledger history
``[(noise, q, steps), ...]`` is their composition.
"""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting as dpa

KINDS = ("gaussian", "laplace")


def step_event(kind: str, noise: float, q: float):
    """One Poisson-subsampled step: ``PoissonSampledDpEvent(q, GaussianDpEvent(σ) | LaplaceDpEvent(λ))``."""
    if kind == "gaussian":
        inner = dpa.GaussianDpEvent(float(noise))
    elif kind == "laplace":
        inner = dpa.LaplaceDpEvent(float(noise))
    else:
        raise ValueError(f"no dp_accounting event for mechanism {kind!r}; known: {', '.join(KINDS)}")
    return dpa.PoissonSampledDpEvent(float(q), inner)


def run_event(kind: str, noise: float, q: float, steps: int):
    """``steps`` compositions of one step (a whole training run at constant σ/λ and q)."""
    return dpa.SelfComposedDpEvent(step_event(kind, noise, q), int(steps))


def history_event(kind: str, history: Sequence[tuple[float, float, int]]):
    """The composition of a ledger history ``[(noise, q, steps), ...]`` (empty segments dropped)."""
    events = [run_event(kind, s, q, t) for s, q, t in history if int(t) > 0]
    return events[0] if len(events) == 1 else dpa.ComposedDpEvent(events)


def runs_event(runs: Sequence[tuple[str, float, float, int]]):
    """The composition of several runs ``(kind, noise, q, steps)`` (e.g. every trial of a search)."""
    return dpa.ComposedDpEvent([run_event(*r) for r in runs])
