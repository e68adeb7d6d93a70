"""A DP-SGD run's privacy profile δ(ε') and trade-off curve: what the membership-inference audit checks against.

Two neighbouring relations (docs/privacy.md, "The check"):

- ``add-or-remove-one``: what the run's ε (Opacus, dp_accounting) is stated for; two training sets
  differ by one example present or absent.
- ``replace-one``: two training sets of one size differ in one example, z in one and z′ in its
  place. This is the relation of the audit's experiment (members are training images, non-members
  test images of the same model), so it is the one the audit checks.

A :class:`TradeOff` holds an upper bound on δ(ε') = sup H_{e^{ε'}}(M(D)‖M(D′)) over neighbours in
either order, and ``allowed_tpr``, the largest true-positive rate any test telling M(D) from M(D′)
can reach at a false-positive rate (one minus the f-DP trade-off function).

How each is built (``trade_off``), from dp_accounting's pessimistic PLD (every value an upper bound):

- add-or-remove, Gaussian or Laplace: the Poisson-subsampled mechanism's PLD composed ``steps``
  times, δ the larger of the remove and the add direction.
- replace-one, Gaussian: dp_accounting's PLD with ``NeighboringRelation.REPLACE_ONE`` (its
  dominating pair q·N(−1, σ²) + (1−q)·N(0, σ²) against q·N(1, σ²) + (1−q)·N(0, σ²)).
- replace-one, Laplace: dp_accounting has no replace-one PLD for the Poisson-subsampled Laplace
  mechanism. dpcam bounds **one step** by group privacy in f-DP form with the two legs kept apart
  (``group_trade_off``; Dong, Roth & Su 2022, Thm 2.14): D ∪ {z′} → D → D ∪ {z} is a removal then
  an addition, so a test with rate u under D ∪ {z′} has rate at most f(u) under D and g(f(u))
  under D ∪ {z}, f and g the largest rates the removal and the addition allow (each the (ε, δ)
  lines of its own direction's PLD: the remove and the add hockey-stick divergences); the path
  through D ∪ {z, z′} gives f(g(u)), so one step allows min(g∘f, f∘g). That curve is concave;
  δ̂(kh) = sup_u curve(u) − e^{kh}·u is bounded from above on a grid by its chords, and the lines
  δ̂(kh) define a symmetric pair of distributions whose ROC lies above the curve in both orders
  (``_envelope_pmf``), so it dominates every replace-one pair of one step. dp_accounting composes
  that pair's PLD ``steps`` times (f-DP composition, Dong, Roth & Su 2022, Thm 3.2; dominating
  pairs, Zhu, Dong & Wang 2022). It only assumes what the add/remove accounting of the run
  already does (dp_accounting's remove and add pairs of one step). Without subsampling it is
  exact: one Laplace step with noise λ gives replace-one ε = 2/λ at δ = 0 (Laplace with
  sensitivity 2); applied to the Gaussian it gives back dp_accounting's REPLACE_ONE ε to < 1 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PLD_GRID = 2001  # ε' grid points of the privacy-profile curve
ADD_REMOVE = "add-or-remove-one"
REPLACE_ONE = "replace-one"
RELATIONS = (ADD_REMOVE, REPLACE_ONE)
SCHEMES = ("gaussian", "laplace")
_DELTA_FLOOR = 1e-10  # the profile's ε' grid runs up to the ε at min(δ, this)
_TAIL = np.logspace(-16, 0, 2001)
_U_GRID = np.unique(np.r_[0.0, _TAIL, 1.0 - _TAIL, 1.0])  # FPRs where a composed curve's δ is bounded: dense at 0 and 1
_STEP_VDI = 1e-5  # PLD discretisation of one step, before its replace-one curve is built
_SLACK = 1e-12  # added to δ bounds computed from the composed curve (floating-point rounding of its chords)


def allowed_line(fpr, epsilons, deltas_up, deltas_down=None) -> np.ndarray:
    """The largest rate E_Y φ a test can have when E_X φ = ``fpr``, given δ's of both directions.

    ``deltas_up``\\[i] ≥ H_{e^{εᵢ}}(Y‖X) and ``deltas_down``\\[i] ≥ H_{e^{εᵢ}}(X‖Y) (the same when None), εᵢ ≥ 0.
    Returns float64 (m,) in [0, 1]: ``min over i of min(e^{εᵢ}·fpr + upᵢ, 1 − e^{−εᵢ}·(1 − fpr − downᵢ))``.
    With X = the model without the candidate and Y = with it, this is the largest TPR at FPR ``fpr``.
    """
    a = np.asarray(fpr, np.float64).reshape(-1, 1)
    e = np.asarray(epsilons, np.float64).reshape(1, -1)
    up = np.asarray(deltas_up, np.float64).reshape(1, -1)
    down = up if deltas_down is None else np.asarray(deltas_down, np.float64).reshape(1, -1)
    out = np.empty(a.shape[0])
    for start in range(0, a.shape[0], 256):  # bounded memory: 256 × grid at a time
        u = a[start : start + 256]
        with np.errstate(over="ignore"):
            out[start : start + 256] = np.minimum(np.exp(e) * u + up, 1.0 - np.exp(-e) * (1.0 - u - down)).min(axis=1)
    return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True)
class TradeOff:
    """A run's privacy profile and trade-off curve for one neighbouring relation.

    ``epsilons`` / ``deltas``: the profile δ(ε') on a grid of ε' ≥ 0 (each δ an upper bound, both
    orders of the neighbours); ``points``: further valid (ε, δ) pairs (the accountant's own);
    ``legs``: for a composed curve, the two legs (ε grid, δ up, δ down) whose composition is the curve.
    """

    relation: str
    method: str
    epsilons: np.ndarray = field(repr=False)
    deltas: np.ndarray = field(repr=False)
    points: tuple[tuple[float, float], ...] = ()
    legs: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = field(default=(), repr=False)

    @property
    def profile(self) -> tuple[np.ndarray, np.ndarray]:
        """(ε', δ(ε')) pairs: the grid, then ``points``."""
        extra = np.asarray(self.points, np.float64).reshape(-1, 2)
        return np.r_[self.epsilons, extra[:, 0]], np.r_[self.deltas, extra[:, 1]]

    def allowed_tpr(self, fpr) -> np.ndarray:
        """The largest TPR a membership test may reach at each FPR (float (m,) → float64 (m,) in [0, 1])."""
        fpr = np.asarray(fpr, np.float64).reshape(-1)
        if not self.legs:
            return allowed_line(fpr, *self.profile)
        f, g = (_leg(*leg) for leg in self.legs)
        return np.minimum(g(f(fpr)), f(g(fpr)))

    def epsilon(self, delta: float) -> float | None:
        """Smallest ε' of the grid with δ(ε') ≤ ``delta`` (``points`` left out); None when there is none."""
        ok = self.deltas <= delta
        return float(self.epsilons[ok].min()) if ok.any() else None


def _leg(epsilons, up, down) -> Callable[[np.ndarray], np.ndarray]:
    return lambda u: allowed_line(u, epsilons, up, down)


def trade_off(
    scheme: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    epsilon: float | None = None,
    relation: str = REPLACE_ONE,
) -> TradeOff:
    """The :class:`TradeOff` of ``steps`` Poisson-subsampled steps for ``relation`` (see the module docstring).

    ``scheme`` ``gaussian`` (σ = ``noise_multiplier``, L2 sensitivity 1) or ``laplace`` (λ, L1
    sensitivity 1), sampling rate ``sample_rate``. The grid of ε' runs from 0 to the ε at
    δ = min(``delta``, 1e-10) (for the composed Laplace curve: twice that of one leg), PLD_GRID
    points; PLD discretisation 1e-3 (or ``epsilon``/200 when smaller). ``epsilon``: the run's
    recorded add/remove ε at ``delta``, added as a point of the add/remove profile.
    """
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if scheme not in SCHEMES:
        raise ValueError(f"no privacy profile for scheme {scheme!r}")
    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; known: {', '.join(RELATIONS)}")
    sigma, q, steps = float(noise_multiplier), float(sample_rate), int(steps)
    floor = min(delta, _DELTA_FLOOR)
    name = f"dp_accounting pessimistic PLD of the Poisson-subsampled {scheme} mechanism, {steps} steps"
    if scheme == "laplace" and relation == REPLACE_ONE:
        one = pld_lib.from_laplace_mechanism(
            sigma, sensitivity=1, sampling_prob=q, value_discretization_interval=_STEP_VDI
        )
        return _replace_one_by_steps(one, steps, floor, epsilon, name)
    vdi = min(1e-3, epsilon / 200) if epsilon else 1e-3
    if scheme == "gaussian":
        rel = NeighboringRelation.REPLACE_ONE if relation == REPLACE_ONE else NeighboringRelation.ADD_OR_REMOVE_ONE
        one = pld_lib.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=vdi, neighboring_relation=rel
        )
    else:
        one = pld_lib.from_laplace_mechanism(sigma, sensitivity=1, sampling_prob=q, value_discretization_interval=vdi)
    pld = one.self_compose(steps) if steps > 1 else one
    if relation == ADD_REMOVE:
        eps = _grid(pld.get_epsilon_for_delta, floor, epsilon)
        points = ((float(epsilon), float(delta)),) if epsilon is not None else ()
        return TradeOff(ADD_REMOVE, f"{name}, add or remove", eps, np.asarray(pld.get_delta_for_epsilon(eps)), points)
    eps = _grid(pld.get_epsilon_for_delta, floor, 2 * epsilon if epsilon else None)
    return TradeOff(REPLACE_ONE, f"{name}, REPLACE_ONE", eps, np.asarray(pld.get_delta_for_epsilon(eps)))


def _grid(epsilon_for_delta, floor: float, fallback: float | None) -> np.ndarray:
    """PLD_GRID values of ε' from 0 to the ε at δ = ``floor`` (3·``fallback`` or 1 when that is not finite)."""
    top = float(epsilon_for_delta(floor))
    top = top * (1 + 1e-9) if math.isfinite(top) and top > 0 else max(1.0, 3 * (fallback or 1.0))
    return np.linspace(0.0, top, PLD_GRID)  # (the nudge: dp_accounting's ε can sit a rounding error below a loss)


def _replace_one_by_steps(one, steps: int, floor: float, epsilon: float | None, name: str) -> TradeOff:
    """Replace-one trade-off of ``steps`` compositions of a Poisson-subsampled step whose add/remove PLD is ``one``.

    One step's replace-one curve is the composition of its remove and add legs (``group_trade_off``);
    its profile δ̂(kh) (chord upper bounds) defines a symmetric pair of distributions whose ROC is the
    concave envelope of the (kh, δ̂) lines (``_envelope_pmf``), so every privacy loss lies on the
    grid h·ℤ; dp_accounting composes that pair's PLD ``steps`` times (f-DP composition, Dong, Roth & Su
    2022, Thm 3.2, via dominating pairs, Zhu, Dong & Wang 2022).
    """
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    step = group_trade_off(one)
    reach = 2 * float(step.epsilons[-1])  # the composed step's δ falls to its floor by twice one leg's reach
    h = _snap_down(min(1e-3, max(reach, 1e-6) / 200, epsilon / 200 if epsilon else 1e-3))
    ks = np.arange(int(math.ceil(reach / h)) + 1)
    deltas = np.minimum(_conjugate_upper(_U_GRID, step.allowed_tpr(_U_GRID), ks * h) + _SLACK, 1.0)
    pmf, infinity = _envelope_pmf(deltas, h)
    pld = PrivacyLossDistribution.create_from_rounded_probability(pmf, infinity, h)
    pld = pld.self_compose(steps) if steps > 1 else pld
    eps = _grid(pld.get_epsilon_for_delta, floor, 2 * epsilon if epsilon else None)
    method = (
        f"{name}: each step's replace-one curve is the composition of its remove and add legs (group privacy in "
        "f-DP form; dp_accounting has no replace-one PLD for the subsampled Laplace mechanism), then the steps "
        "are composed by PLD"
    )
    return TradeOff(REPLACE_ONE, method, eps, np.asarray(pld.get_delta_for_epsilon(eps), np.float64))


def group_trade_off(pld, floor: float = 1e-15) -> TradeOff:
    """Replace-one curve of a mechanism from its add/remove PLD: the composition of the remove and add legs.

    For any test with rate u under D ∪ {z′}: at most f(u) under D (the removal leg, bounded by the
    remove and add hockey-stick divergences of ``pld``) and at most g(f(u)) under D ∪ {z} (the addition
    leg); through D ∪ {z, z′} the legs come in the other order, so the curve is min(g∘f, f∘g). Each
    leg uses PLD_GRID values of ε from 0 to the ε at δ = ``floor``. Valid for neighbours in either order.
    """
    remove, add = _directions(pld)
    eps = _grid(pld.get_epsilon_for_delta, floor, None)
    d_remove, d_add = np.asarray(remove(eps), np.float64), np.asarray(add(eps), np.float64)
    legs = ((eps, d_add, d_remove), (eps, d_remove, d_add))  # D∪{z′} → D (remove), D → D∪{z} (add)
    return TradeOff(REPLACE_ONE, "composition of the remove and add legs", eps, d_remove, legs=legs)


def _snap_down(x: float) -> float:
    """Largest value of the 1-2-5 ladder (…, 1e-4, 2e-4, 5e-4, 1e-3, …) that is ≤ x."""
    e = math.floor(math.log10(x))
    m = x / 10.0**e
    return (5 if m >= 5 else 2 if m >= 2 else 1) * 10.0**e


def _envelope_pmf(deltas: np.ndarray, h: float) -> tuple[dict[int, float], float]:
    """The privacy-loss PMF of a symmetric pair (P, Q) whose ROC is the lower envelope of the lines
    TPR = e^{kh}·FPR + δ_k and TPR = 1 − e^{−kh}·(1 − FPR − δ_k) (k = 0, 1, …) and TPR = 1.

    That envelope is concave and lies above every curve the δ_k bound, in both orders of the
    neighbours, and equals its mirror image, so (P, Q) dominates them. A piece of slope e^{±kh} over
    an FPR interval of length ℓ is an outcome with Q-mass ℓ and P-mass e^{±kh}·ℓ, privacy loss ±kh;
    the envelope's value at FPR 0 is P-mass with no Q-mass (infinite loss). Returns
    ``({±k: P-mass}, infinity mass)``.
    """
    k = np.arange(deltas.size)
    lines = [(math.exp(i * h), float(d), int(i)) for i, d in zip(k[::-1], deltas[::-1])]  # slopes e^{kh}, falling
    lines += [(math.exp(-i * h), 1.0 - math.exp(-i * h) * (1.0 - float(d)), -int(i)) for i, d in zip(k[1:], deltas[1:])]
    lines.append((0.0, 1.0, None))  # TPR ≤ 1: loss −∞, no P-mass
    hull: list[tuple[float, float, int | None]] = []
    for line in lines:  # the lower envelope of lines by falling slope (the convex-hull trick)
        while len(hull) >= 2 and _meet(hull[-2], line) <= _meet(hull[-2], hull[-1]):
            hull.pop()
        hull.append(line)
    pmf: dict[int, float] = {}
    ends = [0.0, *(_meet(a, b) for a, b in zip(hull, hull[1:])), 1.0]
    for (slope, _, index), lo, hi in zip(hull, ends, ends[1:]):
        lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
        if hi > lo and index is not None:
            pmf[index] = pmf.get(index, 0.0) + slope * (hi - lo)
    return pmf, min(line[1] for line in lines)  # the envelope at FPR 0


def _meet(a: tuple[float, float, int | None], b: tuple[float, float, int | None]) -> float:
    """FPR where two lines (slope, intercept, _) of different slopes meet."""
    return (b[1] - a[1]) / (a[0] - b[0])


def _directions(pld) -> tuple[Callable, Callable]:
    """δ(ε) of the remove direction, H(M(D∪{x})‖M(D)), and of the add direction, H(M(D)‖M(D∪{x})).

    dp_accounting keeps them as ``_pmf_remove`` / ``_pmf_add``; without them both are the larger of the
    two (``get_delta_for_epsilon``), a valid but looser bound for each direction.
    """
    remove, add = getattr(pld, "_pmf_remove", None), getattr(pld, "_pmf_add", None)
    if not (hasattr(remove, "get_delta_for_epsilon") and hasattr(add, "get_delta_for_epsilon")):
        return pld.get_delta_for_epsilon, pld.get_delta_for_epsilon
    return remove.get_delta_for_epsilon, add.get_delta_for_epsilon


def _conjugate_upper(u: np.ndarray, a: np.ndarray, epsilons: np.ndarray) -> np.ndarray:
    """Upper bounds on sup over u in [0, 1] of a(u) − e^ε·u, for each ε, from a on a sorted grid ``u``.

    ``a`` is concave and non-decreasing with values ``a`` on ``u`` (0 and 1 included). On [u_j, u_{j+1}],
    concavity puts a below the extensions of its neighbouring chords (slopes m_{j−1} and m_{j+1}), so the
    supremum there is at an end or where the two extensions meet; the first and last intervals use
    a(u) ≤ a(u_{j+1}). Returns float64 (len(epsilons),), ≥ 0.
    """
    u, a = np.asarray(u, np.float64), np.asarray(a, np.float64)
    slope = np.diff(a) / np.diff(u)  # chord slope of [u_j, u_{j+1}]
    j = np.arange(1, u.size - 2)  # intervals with a chord on each side
    left, right = slope[j - 1], slope[j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (a[j + 1] - a[j] + left * u[j] - right * u[j + 1]) / (left - right)
    cross = np.where(left > right, np.clip(cross, u[j], u[j + 1]), u[j])
    top = np.minimum(a[j] + left * (cross - u[j]), a[j + 1] + right * (cross - u[j + 1]))
    out = np.empty(len(epsilons))
    for k, e in enumerate(np.asarray(epsilons, np.float64)):
        g = math.exp(e)
        out[k] = max(
            float(np.max(a - g * u)),  # the grid points themselves
            float(np.max(top - g * cross)),  # where the chord extensions meet
            float(a[1] - g * u[0]),  # first interval
            float(a[-1] - g * u[-2]),  # last interval
            0.0,
        )
    return out


def privacy_profile(
    scheme: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    epsilon: float | None = None,
    relation: str = ADD_REMOVE,
) -> tuple[np.ndarray, np.ndarray]:
    """δ(ε') of a DP-SGD run on a grid of ε' ≥ 0: ``trade_off(...).profile`` (float64 ``(epsilons, deltas)``).

    For add/remove: PLD_GRID + 1 pairs, the grid then the run's own (``epsilon``, ``delta``) when given.
    """
    return trade_off(scheme, noise_multiplier, sample_rate, steps, delta, epsilon, relation).profile


def profile_epsilon(profile: tuple[np.ndarray, np.ndarray], delta: float) -> float | None:
    """Smallest grid ε' of the profile with δ(ε') ≤ ``delta`` (None if none)."""
    eps, deltas = profile
    ok = deltas[:PLD_GRID] <= delta
    return float(eps[:PLD_GRID][ok].min()) if ok.any() else None
