"""Privacy accounting: ε for DP-SGD with Gaussian noise (Opacus) or Laplace noise (dp_accounting PLD).

Every ε dpcam prints comes from one of these functions, for the noise multiplier, sampling rate and
number of steps actually used. All mechanisms are Poisson-subsampled with the add-or-remove-one
neighbouring relation (what Opacus's DPDataLoader implements).

Gaussian (``scheme: gaussian``): per-example L2 clip C, noise N(0, (σC)²) per coordinate; ε from an
Opacus accountant (``prv`` default, ``rdp``, ``gdp``), cross-checked with Google dp_accounting's RDP
accountant, an implementation independent of Opacus.

Laplace (``scheme: laplace``): per-example L1 clip C, noise Laplace(0, λC) per coordinate; one step is
(1/λ)-DP (L1 sensitivity C), Poisson subsampling at rate q amplifies that to
ε₀' = log(1 + q(e^{1/λ} − 1)); ε(δ) for T steps comes from dp_accounting's PLD accountant on
``SelfComposedDpEvent(PoissonSampledDpEvent(q, LaplaceDpEvent(λ)), T)``. A closed-form
composition bound (min of basic and advanced composition of ε₀') is an independent upper bound.

The Laplace part needs no torch; the Gaussian part imports Opacus lazily.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dp_accounting as dpa
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant

from dpcam.errors import UserError
from dpcam.privacy.events import history_event, run_event

logger = logging.getLogger(__name__)

GAUSSIAN_ACCOUNTANTS = ("prv", "rdp", "gdp")
LAPLACE_ACCOUNTANT = "pld"
MAX_NOISE_MULTIPLIER = 1e6  # the same ceiling as Opacus's get_noise_multiplier (MAX_SIGMA)
CALIBRATION_RTOL = 0.005  # calibrated ε lies in [target·(1 − rtol), target]

# PLD discretisation (see _pld_discretization): the grid step is at most 1/50 of the largest
# per-step privacy loss and 1/1000 of a closed-form upper bound on the composed ε. Measured against
# a 10× finer grid: ≤ 0.1 % relative excess, ≤ 0.15-0.5 s per ε for T ≤ 7000 (2 cores).
_PLD_STEP_FRACTION = 50.0
_PLD_TOTAL_FRACTION = 1000.0


# --------------------------------------------------------------------------- validation


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise UserError(f"δ must be in (0, 1), got {delta!r}; use e.g. 1e-4 (below 1/N for N training images)")


def _check_target_epsilon(target_epsilon: float) -> None:
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise UserError(f"target ε must be a finite number > 0, got {target_epsilon!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise UserError(f"sample rate q must be in (0, 1], got {sample_rate!r}")


def _check_steps(steps: int, *, allow_zero: bool = True) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < (0 if allow_zero else 1):
        raise UserError(f"steps must be an integer ≥ {0 if allow_zero else 1}, got {steps!r}")


def _check_noise(noise_multiplier: float, name: str) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and not math.isnan(noise_multiplier)):
        raise UserError(f"{name} must be a number ≥ 0, got {noise_multiplier!r}")


def check_accountant(accountant: str) -> str:
    """Return ``accountant`` if it is an Opacus accountant dpcam supports, else raise UserError."""
    if accountant not in GAUSSIAN_ACCOUNTANTS:
        raise UserError(f"unknown accountant {accountant!r}; choose one of {', '.join(GAUSSIAN_ACCOUNTANTS)}")
    return accountant


# --------------------------------------------------------------------------- Gaussian (Opacus)


def _opacus_accountant(accountant: str):
    """A fresh Opacus accountant; Opacus's own GDP warning is re-issued through warnings and logging."""
    from opacus.accountants import create_accountant

    check_accountant(accountant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = create_accountant(mechanism=accountant)
    for w in caught:
        msg = f"accountant {accountant!r}: {w.message}"
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return acc


def _gaussian_history(history, delta: float) -> tuple[list[tuple[float, float, int]], float | None]:
    """Validated ``[(σ, q, steps), ...]`` without empty segments, and ε when it needs no accountant:
    0.0 for no steps, ``inf`` when any segment has σ = 0 (clipping without noise)."""
    _check_delta(delta)
    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return history, 0.0
    if any(s == 0 for s, _, _ in history):
        return history, math.inf
    return history, None


# The rdp accountant's orders: Opacus's (1.1 … 63) and larger ones. Under noise strong for its steps (σ 20, q 1/17,
# 10 steps) the best order lies above 63, where Opacus's range stops (and warns) with 3× the ε; more orders only
# tighten the bound, which stays valid (the minimum over the orders tried). dp_accounting's cross-check tries
# 1.1 … 1024 already: its best orders in the default study are 2.9 (ε = 10) and 29 (ε = 0.5), inside its range.
RDP_ORDERS = (*(1 + x / 10.0 for x in range(1, 100)), *range(12, 64), 80, 96, 128, 192, 256, 512, 1024)
# Opacus's PRV accountant sizes its discretisation domain with an RDP bound at Opacus's fixed orders (1.1 … 63) and
# warns when the best is 63: a looser domain bound costs grid points, not validity (ε stays PRV's upper bound).
PRV_DOMAIN_WARNING = "Optimal order is the largest alpha"


def gaussian_epsilon_history(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "prv"
) -> float:
    """ε at ``delta`` of a sequence of Poisson-subsampled Gaussian steps, by an Opacus accountant.

    ``history`` is Opacus's accountant history: ``[(noise_multiplier σ, sample_rate q, steps), ...]``.
    Returns 0.0 for no steps and ``inf`` when any segment has σ = 0 (clipping without noise).
    """
    history, trivial = _gaussian_history(history, delta)
    if trivial is not None:
        return trivial
    acc = _opacus_accountant(accountant)
    if accountant == "gdp" and len(history) > 1:
        raise UserError("the gdp accountant needs one constant noise multiplier and sample rate; use prv or rdp")
    acc.history = list(history)
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
    with warnings.catch_warnings():
        if accountant == "prv":  # PRV's grid, not its bound: nothing a user can act on (PRV_DOMAIN_WARNING)
            warnings.filterwarnings("ignore", message=PRV_DOMAIN_WARNING)
        return float(acc.get_epsilon(delta=delta))


def gaussian_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (noise σ·C, L2 clip C), by Opacus.

    ``accountant``: ``prv`` (Gopi et al., an upper bound, default), ``rdp``, or ``gdp`` (Opacus warns:
    not a valid upper bound in general). Returns 0.0 for 0 steps, ``inf`` for σ = 0.
    """
    _check_noise(noise_multiplier, "noise multiplier σ")
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    check_accountant(accountant)
    return gaussian_epsilon_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def gaussian_epsilon_rdp_dp_accounting(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Independent cross-check: dp_accounting's RdpAccountant on
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)`` at ``delta``.
    Returns 0.0 for 0 steps, ``inf`` for σ = 0."""
    _check_noise(noise_multiplier, "noise multiplier σ")
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    return gaussian_epsilon_rdp_dp_accounting_history([(noise_multiplier, sample_rate, steps)], delta)


def gaussian_epsilon_rdp_dp_accounting_history(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """``gaussian_epsilon_rdp_dp_accounting`` for an Opacus-style history ``[(σ, q, steps), ...]``."""
    history, trivial = _gaussian_history(history, delta)
    if trivial is not None:
        return trivial
    # dp_accounting logs (absl) a warning for each low RDP order whose series does not converge and
    # drops that order; the bound stays valid (it is the minimum over the remaining orders)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        acc = dpa.rdp.RdpAccountant()
        acc.compose(history_event("gaussian", history))
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def calibrate_gaussian(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest σ (to 0.5 % of the target ε) whose ε after ``steps`` steps at rate ``sample_rate``
    is ≤ ``target_epsilon``.

    Uses ``opacus.accountants.utils.get_noise_multiplier`` (bisection; it returns the upper end of its
    bracket, so ε(σ) ≤ target). Raises UserError when no σ ≤ 10⁶ reaches the target.
    """
    from opacus.accountants.utils import get_noise_multiplier

    _check_target_epsilon(target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, allow_zero=False)
    check_accountant(accountant)
    with warnings.catch_warnings():
        # one GDP warning is enough: _opacus_accountant below re-issues it
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        # PRV sizes its domain with RDP; at the large σ probed first RDP's best order is its largest
        warnings.filterwarnings("ignore", message=PRV_DOMAIN_WARNING)
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=CALIBRATION_RTOL * target_epsilon,
            )
        except ValueError as err:
            raise UserError(_unreachable(target_epsilon, delta, sample_rate, steps, "σ")) from err
    if accountant == "gdp":
        _opacus_accountant("gdp")  # surface Opacus's warning once per calibration
    return float(sigma)


def reachable(
    scheme: str, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> bool:
    """Whether some noise ≤ 10⁶ reaches ``target_epsilon`` (checked before a grid trains, so an impossible recipe
    stops before any run): a cheap upper bound first (RDP for Gaussian, basic composition for Laplace), the
    calibration itself only when that bound is not enough."""
    if scheme == "laplace":
        if steps * math.log1p(sample_rate * math.expm1(1 / MAX_NOISE_MULTIPLIER)) <= target_epsilon:
            return True
        calibrate = calibrate_laplace
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PRV_DOMAIN_WARNING)
            if gaussian_epsilon(MAX_NOISE_MULTIPLIER, sample_rate, steps, delta, accountant="rdp") <= target_epsilon:
                return True

        def calibrate(t, d, q, n):
            return calibrate_gaussian(t, d, q, n, accountant)

    try:
        calibrate(target_epsilon, delta, sample_rate, steps)
    except UserError:
        return False
    return True


def _unreachable(target_epsilon: float, delta: float, sample_rate: float, steps: int, param: str) -> str:
    return (
        f"target ε={target_epsilon:g} at δ={delta:g} cannot be reached in {steps} steps at sample rate "
        f"{sample_rate:.4g} with any {param} ≤ {MAX_NOISE_MULTIPLIER:g}; "
        "raise ε, or train fewer epochs / use smaller batches"
    )


# --------------------------------------------------------------------------- Laplace (dp_accounting PLD)


def laplace_step_epsilon(noise_multiplier: float) -> float:
    """Pure ε of one Laplace step without subsampling: L1 sensitivity C, scale λC → ε = 1/λ."""
    _check_noise(noise_multiplier, "noise multiplier λ")
    return math.inf if noise_multiplier == 0 else 1.0 / noise_multiplier


def laplace_amplified_step_epsilon(noise_multiplier: float, sample_rate: float) -> float:
    """Pure ε of one Poisson-subsampled Laplace step: log(1 + q(e^{1/λ} − 1)) (add-or-remove neighbours)."""
    _check_sample_rate(sample_rate)
    eps0 = laplace_step_epsilon(noise_multiplier)
    if math.isinf(eps0):
        return math.inf
    if eps0 > 700:  # e^{eps0} overflows; log(q e^{eps0}) is exact to double precision there
        return math.log(sample_rate) + eps0
    return math.log1p(sample_rate * math.expm1(eps0))


def laplace_composition_bound(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Closed-form upper bound on ε(δ) of composed Poisson-subsampled Laplace steps.

    min(basic composition Σ Tᵢε'ᵢ, advanced composition √(2 ln(1/δ) Σ Tᵢε'ᵢ²) + Σ Tᵢε'ᵢ(e^{ε'ᵢ} − 1))
    with ε'ᵢ the amplified per-step ε of segment i (Dwork, Rothblum & Vadhan 2010). Independent of
    dp_accounting; the PLD ε is always at most this.

    ``history``: ``[(λ, q, steps), ...]``.
    """
    _check_delta(delta)
    s1 = s2 = s3 = 0.0
    for lam, q, t in history:
        if t == 0:
            continue
        e = laplace_amplified_step_epsilon(lam, q)
        if math.isinf(e):
            return math.inf
        s1 += t * e
        s2 += t * e * e
        s3 += t * e * math.expm1(e) if e < 700 else math.inf
    return min(s1, math.sqrt(2 * math.log(1 / delta) * s2) + s3)


def _snap_down(x: float) -> float:
    """Largest value of the 1-2-5 ladder (…, 1e-4, 2e-4, 5e-4, 1e-3, …) that is ≤ x."""
    e = math.floor(math.log10(x))
    m = x / 10.0**e
    return (5 if m >= 5 else 2 if m >= 2 else 1) * 10.0**e


def _pld_discretization(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """PLD value_discretization_interval for ``history``: fine enough for ≤ 0.1 % error, coarse enough to be fast.

    Pessimistic rounding moves every step's privacy loss up by up to one grid step, so the step must
    be small against the largest per-step loss (ε'/50) and against the total (bound/1000). Snapped to
    a 1-2-5 ladder so that nearby parameters share one grid.
    """
    largest_step = max(laplace_amplified_step_epsilon(lam, q) for lam, q, t in history if t > 0)
    bound = laplace_composition_bound(history, delta)
    return _snap_down(min(largest_step / _PLD_STEP_FRACTION, bound / _PLD_TOTAL_FRACTION))


def laplace_epsilon_history(
    history: Sequence[tuple[float, float, int]], delta: float, value_discretization_interval: float | None = None
) -> float:
    """ε at ``delta`` of composed Poisson-subsampled Laplace steps, by dp_accounting's PLD accountant.

    ``history``: ``[(λ, q, steps), ...]`` (the LaplaceLedger's history, like Opacus's). The PLD uses
    pessimistic (upper-bound) discretisation; ``value_discretization_interval=None`` picks it from the
    parameters (see ``_pld_discretization``), deterministically, so the same history always gives the
    same ε. Returns 0.0 for no steps and ``inf`` when a segment has λ = 0.
    """
    _check_delta(delta)
    history = [(float(lam), float(q), int(t)) for lam, q, t in history]
    for lam, q, t in history:
        _check_noise(lam, "noise multiplier λ")
        _check_sample_rate(q)
        _check_steps(t)
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(lam == 0 for lam, _, _ in history):
        return math.inf
    vdi = value_discretization_interval or _pld_discretization(history, delta)
    acc = PLDAccountant(value_discretization_interval=vdi)
    acc.compose(history_event("laplace", history))
    return float(acc.get_epsilon(delta))


def laplace_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    value_discretization_interval: float | None = None,
) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Laplace steps (L1 clip C, noise scale λC), by PLD.

    See ``laplace_epsilon_history``; ``laplace_step_epsilon`` / ``laplace_amplified_step_epsilon`` give
    the per-step pure ε.
    """
    _check_noise(noise_multiplier, "noise multiplier λ")
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    return laplace_epsilon_history([(noise_multiplier, sample_rate, steps)], delta, value_discretization_interval)


def calibrate_laplace(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest λ (to 0.5 % of the target ε) with ``laplace_epsilon(λ, q, steps, δ) ≤ target_epsilon``.

    Brackets λ between a value that overshoots and the basic-composition value (whose ε is ≤ the
    target), then ``dp_accounting.calibrate_dp_mechanism`` (Brent's method; it guarantees ε ≤ target)
    with the same PLD discretisation rule as ``laplace_epsilon``, so the returned λ reports ε ≤ target.
    About 1-2 s for T up to several thousand (2 cores).
    Raises UserError when λ would exceed 10⁶ (the ceiling Opacus uses for σ).
    """
    _check_target_epsilon(target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, allow_zero=False)

    @functools.cache
    def eps(lam: float) -> float:
        return laplace_epsilon(lam, sample_rate, steps, delta)

    # upper bracket: basic composition gives T·log(1 + q(e^{1/λ} − 1)) = target, so ε(hi) ≤ target
    per_step = target_epsilon / steps
    hi = 1.0 / math.log1p(math.expm1(per_step) / sample_rate)
    while eps(hi) > target_epsilon:  # only if discretisation pushes ε over; never seen in practice
        hi *= 2
        if hi > 1e3 * MAX_NOISE_MULTIPLIER:
            raise UserError(_unreachable(target_epsilon, delta, sample_rate, steps, "λ"))
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    if lo >= MAX_NOISE_MULTIPLIER:  # even the smallest λ that may reach the target is above the ceiling
        raise UserError(_unreachable(target_epsilon, delta, sample_rate, steps, "λ"))
    if eps(hi) >= target_epsilon * (1 - CALIBRATION_RTOL):
        return float(hi)

    # Brent on λ (dp_accounting.calibrate_dp_mechanism, which guarantees ε ≤ target) through an
    # accountant with laplace_epsilon's discretisation rule: the returned λ reports exactly the ε
    # calibrated for. ε falls like λ^-k, k ≈ 1 unless ε is huge, so a tolerance lo·rtol/10 in λ
    # keeps ε well within rtol of the target.
    lam = dpa.calibrate_dp_mechanism(
        AutoGridLaplacePLDAccountant,
        lambda lam: run_event("laplace", lam, sample_rate, steps),
        target_epsilon,
        delta,
        bracket_interval=dpa.ExplicitBracketInterval(lo, hi),
        tol=lo * CALIBRATION_RTOL / 10,
    )
    if lam > MAX_NOISE_MULTIPLIER:
        raise UserError(_unreachable(target_epsilon, delta, sample_rate, steps, "λ"))
    return float(lam)


def l2_laplace_epsilon_bound(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, dimension: int
) -> float:
    """The only ε that L2 clipping + Laplace noise (``laplace-paper``) has: ε at ``delta`` by PLD for its L1
    sensitivity bound.

    A per-example gradient clipped to L2 norm C has L1 norm ≤ √d·C (Cauchy-Schwarz, d = ``dimension`` noised
    coordinates), so Laplace noise of scale σC per coordinate is the Laplace mechanism with noise multiplier
    σ/√d relative to its L1 sensitivity: ``laplace_epsilon(σ/√d, q, steps, δ)``. Valid, and useless (thousands
    for a 15 k-parameter model at the σ of ε = 5): what "no guarantee" means in numbers.
    """
    if not (isinstance(dimension, int) and dimension >= 1):
        raise UserError(f"dimension must be an integer ≥ 1, got {dimension!r}")
    _check_noise(noise_multiplier, "noise multiplier σ")
    return laplace_epsilon(noise_multiplier / math.sqrt(dimension), sample_rate, steps, delta)


class AutoGridLaplacePLDAccountant(PrivacyAccountant):
    """dp_accounting PrivacyAccountant for Poisson-subsampled Laplace events, PLD on an automatic grid.

    Accepts ``PoissonSampledDpEvent(q, LaplaceDpEvent(λ))`` nested in ``SelfComposedDpEvent`` /
    ``ComposedDpEvent``; ``get_epsilon`` is ``laplace_epsilon_history`` (dp_accounting's PLDAccountant
    with the grid chosen by ``_pld_discretization``). Used by ``calibrate_laplace`` so that
    calibration and reporting share one discretisation rule.
    """

    def __init__(self):
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self.history: list[tuple[float, float, int]] = []

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dpa.NoOpDpEvent):
            return None
        if isinstance(event, dpa.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dpa.ComposedDpEvent):
            for e in event.events:
                err = self._maybe_compose(e, count, do_compose)
                if err is not None:
                    return err
            return None
        if isinstance(event, dpa.PoissonSampledDpEvent) and isinstance(event.event, dpa.LaplaceDpEvent):
            if do_compose:
                self.history.append((event.event.noise_multiplier, event.sampling_probability, count))
            return None
        return self.CompositionErrorDetails(invalid_event=event, error_message="only Poisson-sampled Laplace events")

    def get_epsilon(self, target_delta: float) -> float:
        return laplace_epsilon_history(self.history, target_delta)


# --------------------------------------------------------------------------- report


@dataclass
class PrivacyReport:
    """What a training run records about its privacy (train.json; docs/privacy.md).

    ``epsilon`` is spent so far (steps actually taken); ``inf`` when the run is not private.
    ``epsilon_rdp_check``: dp_accounting RDP ε (Gaussian), independent of Opacus.
    ``epsilon_composition_bound``: closed-form composition bound (Laplace), independent of dp_accounting.
    ``step_epsilon`` / ``step_epsilon_amplified``: pure ε of one Laplace step, without / with subsampling.
    ``guarantee``: ``"dp"`` for gaussian and laplace, ``"none"`` for laplace-paper (with ``guarantee_reason``;
    its ``epsilon``, ``target_epsilon`` and ``delta`` are None and the ε its noise was calibrated from is
    ``nominal_epsilon``). Fields left None are not run-specific (non-private schemes).
    """

    scheme: str
    target_epsilon: float | None
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    steps: int
    accountant: str | None
    epsilon_rdp_check: float | None = None
    epsilon_composition_bound: float | None = None
    step_epsilon: float | None = None
    step_epsilon_amplified: float | None = None
    steps_planned: int | None = None
    guarantee: str | None = None  # "dp": (ε, δ) by the accountant; "none": noise without a guarantee (laplace-paper)
    guarantee_reason: str | None = None
    noise_scale: float | None = None  # per coordinate: the Gaussian's std σC, the Laplace scale λC or σC
    nominal_epsilon: float | None = None  # laplace-paper: the ε its σ was calibrated from, not a guarantee
    nominal_delta: float | None = None
    nominal_accountant: str | None = None
    epsilon_l1_bound: float | None = None  # laplace-paper: the valid ε for L1 sensitivity C·√d (useless)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats (ε = ∞ of a non-private run) become ``None`` (null)."""
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
