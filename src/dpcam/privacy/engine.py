"""Make a model, optimizer and data loader private for one privacy scheme (docs/privacy.md).

``make_private(...)`` returns a ``PrivateSetup``: the objects to train with, the privacy ledger of the
steps actually taken (Opacus's accountant for ``gaussian``/``clip-only``, ``LaplaceLedger`` for
``laplace``), ``epsilon()``, ``state_dict()``/``load_state_dict()`` of the ledger, ``report()`` and
``plain_module`` (the bare ``nn.Module``, for evaluation and Captum).

Every DP scheme uses Poisson sampling (Opacus's ``DPDataLoader``). The noise is calibrated here, not by
``PrivacyEngine.make_private_with_epsilon``: that method calibrates for q₀ = 1/len(loader) and
int(epochs/q₀) steps, while Opacus then accounts every step at q = 1/len(DPDataLoader), which is larger
when 1/q₀ rounds down (e.g. 93 batches → 92 Poisson batches of rate 1/92), so its accounted ε can
exceed the target (ε = 1.005 for target 1, 93 batches, 3 epochs). We calibrate for the q Opacus
accounts with and the steps the loader will yield (epochs × len(DPDataLoader)), so ε ≤ target.

Precision (``precision="bf16"``) is :mod:`dpcam.privacy.precision`'s: ``make_private`` checks it and
``DPCamPrivacyEngine`` builds its float32-clipping optimizers. The returned ``PrivateSetup`` is
:mod:`dpcam.privacy.setup`'s.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, GRAD_SAMPLE_MODES, NOISED_SCHEMES, SCHEMES, UNGUARANTEED_SCHEMES
from dpcam.privacy import accounting
from dpcam.privacy.laplace import (
    LEDGER_MECHANISM,
    NO_GUARANTEE,
    PAPER_LEDGER_MECHANISM,
    LaplaceDPOptimizer,
    LaplaceLedger,
    PaperLaplaceDPOptimizer,
)
from dpcam.privacy.plan import poisson_plan
from dpcam.privacy.precision import (
    BF16_GRAD_SAMPLE_MODES,
    Float32DPOptimizer,
    Float32LaplaceDPOptimizer,
    Float32PaperLaplaceDPOptimizer,
    _check_precision,
    _validate_bf16,
)
from dpcam.privacy.setup import PrivateSetup

logger = logging.getLogger(__name__)

L1_CLIPPING = "l1"  # the clipping name DPCamPrivacyEngine maps to LaplaceDPOptimizer
L2_LAPLACE_CLIPPING = "l2-laplace"  # ... and to PaperLaplaceDPOptimizer (laplace-paper: no guarantee)

__all__ = [
    "DPCamPrivacyEngine",
    "LaplaceLedger",
    "make_private",
]


class DPCamPrivacyEngine(PrivacyEngine):
    """Opacus PrivacyEngine that also knows ``clipping="l1"``: per-example L1 clip + Laplace noise, and
    ``clipping="l2-laplace"``: Opacus's L2 clip + Laplace noise of scale σC (``laplace-paper``, no guarantee).

    Extension through Opacus's own hook (``_prepare_optimizer``); every other clipping mode is Opacus's.
    ``precision="bf16"`` (passed through ``make_private``'s keyword arguments) builds the ``Float32*`` optimizer
    of the scheme, which clips the float32 upcasts of bfloat16 per-sample gradients; ``"fp32"`` (default) builds
    exactly what it builds without it. Build it with ``accountant="laplace-pld"`` (the registered
    ``LaplaceLedger``) for Laplace runs and ``"laplace-paper-none"`` (``NoGuaranteeLedger``, no ε) for the
    replica, so Opacus's Gaussian accountants never count a Laplace step.
    """

    def _prepare_optimizer(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        precision: str = "fp32",
        **kwargs,
    ) -> DPOptimizer:
        bf16 = _check_precision(precision) == "bf16"
        if clipping not in (L1_CLIPPING, L2_LAPLACE_CLIPPING) and not bf16:
            return super()._prepare_optimizer(
                optimizer=optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction=loss_reduction,
                distributed=distributed,
                clipping=clipping,
                noise_generator=noise_generator,
                grad_sample_mode=grad_sample_mode,
                **kwargs,
            )
        cls = _optimizer_class(clipping, bf16, distributed, grad_sample_mode)
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        return cls(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=self.secure_mode,
            **kwargs,
        )


def _optimizer_class(clipping: str, bf16: bool, distributed: bool, grad_sample_mode: str) -> type[DPOptimizer]:
    """The optimizer class ``DPCamPrivacyEngine`` builds where Opacus's own does not do: a Laplace clipping mode,
    or a bf16 run (its ``Float32*`` class); UserError for what they do not support."""
    if clipping in (L1_CLIPPING, L2_LAPLACE_CLIPPING):
        if distributed:
            raise UserError("the laplace schemes do not support distributed training; train on one device")
        if grad_sample_mode.startswith("ghost"):
            raise UserError(
                "the laplace schemes need per-example gradients; use grad_sample_mode hooks, ew or functorch"
            )
        if clipping == L1_CLIPPING:
            return Float32LaplaceDPOptimizer if bf16 else LaplaceDPOptimizer
        return Float32PaperLaplaceDPOptimizer if bf16 else PaperLaplaceDPOptimizer
    if clipping == "flat" and not distributed and grad_sample_mode in BF16_GRAD_SAMPLE_MODES:
        return Float32DPOptimizer  # what Opacus's get_optimizer_class picks (DPOptimizer), clipping in float32
    raise UserError(
        f"precision bf16 supports flat clipping on one device with grad_sample_mode "
        f"{' or '.join(BF16_GRAD_SAMPLE_MODES)}, not clipping {clipping!r}, grad_sample_mode "
        f"{grad_sample_mode!r}{', distributed' if distributed else ''}; use precision fp32"
    )


def _check_positive(value: Any, name: str, how: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a finite number > 0, got {value!r}; {how}")
    return float(value)


def _new_engine(accountant: str, secure_mode: bool, noise_generator: torch.Generator | None) -> DPCamPrivacyEngine:
    """The engine whose accountant is the run's ledger; a seeded noise generator is refused in secure mode."""
    if noise_generator is not None and secure_mode:
        raise UserError("a seeded noise generator cannot be used in secure mode; drop the seed or secure mode")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        if accountant != "gdp":
            warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        try:
            engine = DPCamPrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        except ImportError as err:
            raise UserError("secure mode needs the torchcsprng package; install it or turn secure mode off") from err
    if not secure_mode:
        logger.info("Opacus secure RNG is off: fine for experiments; use secure mode for a production release")
    return engine


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    scheme: str,
    target_epsilon: float | None = None,
    delta: float | None = None,
    max_grad_norm: float | None = None,
    epochs: int | None = None,
    accountant: str = "prv",
    grad_sample_mode: str = "hooks",
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    poisson_sampling: bool = True,
    criterion: Any = None,
    precision: str = "fp32",
    large_delta: bool = False,
) -> PrivateSetup:
    """Wrap ``module``/``optimizer``/``data_loader`` for ``scheme`` and calibrate its noise.

    - ``none`` / ``ldp``: returned unchanged (no clipping, no noise); ε = ∞ (for ``ldp`` the data
      carry the guarantee, recorded by the run).
    - ``clip-only``: Opacus per-example L2 clipping to ``max_grad_norm`` with noise multiplier 0 and
      Poisson sampling; ε = ∞, honestly.
    - ``gaussian``: Opacus DP-SGD; σ from ``calibrate_gaussian`` for (``target_epsilon``, ``delta``) at
      the accounted q over ``epochs`` epochs; ε by the Opacus ``accountant`` (prv, rdp, gdp).
    - ``laplace``: per-example L1 clip + Laplace noise (``LaplaceDPOptimizer``); λ from
      ``calibrate_laplace`` (dp_accounting PLD); steps counted by ``LaplaceLedger``.
    - ``laplace-paper``: the paper's replica, **no guarantee** (warned): Opacus's L2 clip and Laplace noise of
      scale σ·C (``PaperLaplaceDPOptimizer``), σ from ``calibrate_gaussian`` exactly as a gaussian run at the
      same (ε, δ, accountant); steps counted by ``NoGuaranteeLedger``, which gives no ε.

    Only the parameters with ``requires_grad`` are trained, clipped and noised (a fine-tuning run's head or
    last block): the accountant covers exactly those, for the steps and q of this loader.

    ``noise_generator``: a seeded ``torch.Generator`` for reproducible noise (refused with secure mode).
    ``criterion``: the loss (default ``nn.CrossEntropyLoss()``); wrapped by Opacus for grad_sample_mode
    ``ghost``. ``precision``: ``"fp32"`` (default: the objects Opacus builds, unchanged) or ``"bf16"``: train
    each step's forward pass and loss inside ``setup.autocast()``; a clipped scheme then gets the ``Float32*``
    optimizer of its scheme (per-sample gradients upcast to float32, norms accumulated in float64, a float32
    clipped sum and float32 noise) and needs float32 trained parameters and grad_sample_mode hooks or functorch.

    Raises UserError for bad input (unknown scheme/accountant/mode/precision, ε ≤ 0, δ ∉ (0, 1), C ≤ 0,
    epochs < 1, a non-Poisson request for a DP scheme, an incompatible model, an unreachable target, bf16 with
    ghost or ew or low-precision parameters, and δ ≥ 1/N for a scheme with a guarantee unless ``large_delta``,
    which turns that refusal into a warning).
    """
    _check_request(scheme, accountant, precision, module, grad_sample_mode)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    if scheme not in CLIPPED_SCHEMES:
        return PrivateSetup(scheme, module, optimizer, data_loader, criterion=criterion, precision=precision)
    target_epsilon, delta, max_grad_norm = _validate(
        scheme,
        target_epsilon,
        delta,
        max_grad_norm,
        epochs,
        grad_sample_mode,
        poisson_sampling,
        data_loader,
        large_delta,
    )
    sample_rate, steps_per_epoch, steps_planned = poisson_plan(len(data_loader), epochs)
    noise, clipping, ledger_name, accountant_name = _calibrate(
        scheme, target_epsilon, delta, sample_rate, steps_planned, accountant
    )
    extra = _nominal(scheme, target_epsilon, accountant)  # laplace-paper: warned, no guarantee
    engine = _new_engine(ledger_name, secure_mode, noise_generator)
    wrap = dict(noise=noise, max_grad_norm=max_grad_norm, clipping=clipping, noise_generator=noise_generator)
    wrap.update(grad_sample_mode=grad_sample_mode, **({"precision": precision} if precision != "fp32" else {}))
    dp_module, dp_optimizer, criterion, dp_loader = _wrap(engine, module, optimizer, criterion, data_loader, **wrap)
    _check_plan(dp_loader, steps_per_epoch, sample_rate)
    return PrivateSetup(
        scheme=scheme,
        module=dp_module,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        criterion=criterion,
        target_epsilon=None if scheme == "clip-only" or scheme in UNGUARANTEED_SCHEMES else target_epsilon,
        delta=float(delta),
        max_grad_norm=max_grad_norm,
        noise_multiplier=float(noise),
        sample_rate=sample_rate,
        steps_planned=steps_planned,
        accountant=accountant_name,
        engine=engine,
        extra={"poisson_rate": float(dp_loader.sample_rate), "grad_sample_mode": grad_sample_mode, **extra},
        precision=precision,
    )


def _check_request(scheme: str, accountant: str, precision: str, module: nn.Module, grad_sample_mode: str) -> None:
    """The checks every scheme takes (one-line UserErrors): a known scheme, accountant and precision, and what bf16
    cannot train exactly."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown privacy scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    accounting.check_accountant(accountant)
    if _check_precision(precision) == "bf16":
        _validate_bf16(module, scheme, grad_sample_mode)


def _nominal(scheme: str, target_epsilon: float | None, accountant: str) -> dict[str, Any]:
    """The extra report fields of a scheme without a guarantee (laplace-paper: the nominal ε and accountant its
    noise was calibrated for), warned at make_private's caller; {} for a scheme with a guarantee."""
    if scheme not in UNGUARANTEED_SCHEMES:
        return {}
    warnings.warn(NO_GUARANTEE, UserWarning, stacklevel=3)
    return {"nominal_epsilon": target_epsilon, "nominal_accountant": accountant}


def _check_plan(dp_loader: DataLoader, steps_per_epoch: int, sample_rate: float) -> None:
    """Internal check: our Poisson plan (what the accountant is told) must match what Opacus built."""
    if len(dp_loader) != steps_per_epoch or not math.isclose(1 / len(dp_loader), sample_rate):
        raise RuntimeError(
            f"Poisson plan mismatch: planned {steps_per_epoch} batches at q={sample_rate}, "
            f"Opacus built {len(dp_loader)}"
        )


def _validate(
    scheme: str,
    target_epsilon,
    delta,
    max_grad_norm,
    epochs,
    grad_sample_mode: str,
    poisson_sampling: bool,
    data_loader: DataLoader,
    large_delta: bool = False,
) -> tuple[float | None, float, float]:
    """Check a clipped scheme's settings (one-line UserErrors); δ ≥ 1/N for a scheme with a guarantee is refused
    (warned with ``large_delta``). Returns (ε, δ, C) as floats."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise UserError(f"unknown grad_sample_mode {grad_sample_mode!r}; choose one of {', '.join(GRAD_SAMPLE_MODES)}")
    if scheme in ("laplace", "laplace-paper") and grad_sample_mode == "ghost":
        raise UserError(
            f"the {scheme} scheme needs per-example gradients (its own noise); use grad_sample_mode hooks, ew or "
            "functorch"
        )
    if not poisson_sampling:
        raise UserError(
            f"scheme {scheme!r} requires Poisson sampling (its ε assumes it); do not turn poisson_sampling off"
        )
    max_grad_norm = _check_positive(max_grad_norm, "clipping bound C (max_grad_norm)", "use e.g. 1.0")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        raise UserError(f"δ must be in (0, 1), got {delta!r}; use e.g. 1e-4 (below 1/N for N training images)")
    if scheme != "clip-only":
        target_epsilon = _check_positive(target_epsilon, "target ε", "use e.g. 1, or scheme none for ε = ∞")
    if isinstance(data_loader.dataset, IterableDataset):
        raise UserError("Poisson sampling needs a map-style dataset (len and indexing), not an IterableDataset")
    n = len(data_loader.dataset)
    if n == 0 or len(data_loader) == 0:
        raise UserError("the training set is empty; prepare a dataset with training images")
    if delta >= 1 / n and scheme in NOISED_SCHEMES:
        msg = (
            f"δ={delta:g} ≥ 1/N = {1 / n:.3g} for N={n} training examples: "
            "this guarantee allows leaking one example outright; use δ < 1/N"
        )
        if not large_delta:
            raise UserError(f"{msg} (δ·N = {delta * n:.3g}), or set train.force_delta (--force-delta) to accept it")
        warnings.warn(msg, UserWarning, stacklevel=3)  # once: the CLI prints it as one line
    return target_epsilon, float(delta), max_grad_norm


def _calibrate(
    scheme: str, target_epsilon, delta: float, sample_rate: float, steps: int, accountant: str
) -> tuple[float, str, str, str | None]:
    """(noise multiplier, Opacus clipping mode, ledger name, accountant name) of a clipped scheme for its plan."""
    if scheme == "gaussian":
        return (
            accounting.calibrate_gaussian(target_epsilon, delta, sample_rate, steps, accountant),
            "flat",
            accountant,
            accountant,
        )
    if scheme == "laplace":
        return (
            accounting.calibrate_laplace(target_epsilon, delta, sample_rate, steps),
            L1_CLIPPING,
            LEDGER_MECHANISM,
            accounting.LAPLACE_ACCOUNTANT,
        )
    if scheme == "laplace-paper":  # the Gaussian run's σ at the same (ε, δ, q, steps, accountant): no guarantee
        return (
            accounting.calibrate_gaussian(target_epsilon, delta, sample_rate, steps, accountant),
            L2_LAPLACE_CLIPPING,
            PAPER_LEDGER_MECHANISM,
            None,
        )
    return 0.0, "flat", "rdp", None  # clip-only: the Opacus accountant just counts steps (σ = 0, ε = ∞)


def _wrap(engine: DPCamPrivacyEngine, module, optimizer, criterion, data_loader, **kwargs):
    """Opacus' make_private: (module, optimizer, criterion, Poisson loader); one line for an incompatible model."""
    try:
        out = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=kwargs.pop("noise"),
            poisson_sampling=True,
            **kwargs,
        )
    except UnsupportedModuleError as err:
        problems = "; ".join(str(e) for e in (err.args[0] if err.args and isinstance(err.args[0], list) else err.args))
        raise UserError(
            f"model is not compatible with Opacus ({problems}); use a model from the dpcam registry "
            "(BatchNorm replaced by GroupNorm, no in-place ops on activations)"
        ) from err
    if kwargs["grad_sample_mode"] == "ghost":
        return out
    dp_module, dp_optimizer, dp_loader = out
    return dp_module, dp_optimizer, criterion, dp_loader
