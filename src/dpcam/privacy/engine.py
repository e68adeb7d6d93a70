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
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, GRAD_SAMPLE_MODES, SCHEMES, UNGUARANTEED_SCHEMES
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

logger = logging.getLogger(__name__)

L1_CLIPPING = "l1"  # the clipping name DPCamPrivacyEngine maps to LaplaceDPOptimizer
L2_LAPLACE_CLIPPING = "l2-laplace"  # ... and to PaperLaplaceDPOptimizer (laplace-paper: no guarantee)
GUARANTEE_REASON = (
    "L2 clipping bounds a per-example gradient's L1 sensitivity only by C·√d (d = {d} trained parameters), so "
    "Laplace noise of scale σ·C (σ = {sigma:.4g}, Opacus's Gaussian noise multiplier for the nominal ε = {eps:g} "
    "at δ = {delta:g}) gives no useful ε: the only valid bound, for L1 sensitivity C·√d, is ε ≤ {bound:.4g}"
)

__all__ = [
    "DPCamPrivacyEngine",
    "LaplaceLedger",
    "PrivateSetup",
    "make_private",
]


class DPCamPrivacyEngine(PrivacyEngine):
    """Opacus PrivacyEngine that also knows ``clipping="l1"``: per-example L1 clip + Laplace noise, and
    ``clipping="l2-laplace"``: Opacus's L2 clip + Laplace noise of scale σC (``laplace-paper``, no guarantee).

    Extension through Opacus's own hook (``_prepare_optimizer``); every other clipping mode is Opacus's.
    Build it with ``accountant="laplace-pld"`` (the registered ``LaplaceLedger``) for Laplace runs and
    ``"laplace-paper-none"`` (``NoGuaranteeLedger``, no ε) for the replica, so Opacus's Gaussian accountants
    never count a Laplace step.
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
        **kwargs,
    ) -> DPOptimizer:
        if clipping not in (L1_CLIPPING, L2_LAPLACE_CLIPPING):
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
        if distributed:
            raise UserError("the laplace schemes do not support distributed training; train on one device")
        if grad_sample_mode.startswith("ghost"):
            raise UserError(
                "the laplace schemes need per-example gradients; use grad_sample_mode hooks, ew or functorch"
            )
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        cls = LaplaceDPOptimizer if clipping == L1_CLIPPING else PaperLaplaceDPOptimizer
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


def _is_poisson(loader: Any) -> bool:
    return isinstance(loader, DPDataLoader) or isinstance(
        getattr(loader, "batch_sampler", None), UniformWithReplacementSampler
    )


@dataclass
class PrivateSetup:
    """What training needs for one scheme, plus its privacy ledger.

    ``module``: a GradSampleModule for DP schemes (the plain module otherwise); ``optimizer``: a
    DPOptimizer (LaplaceDPOptimizer for laplace, PaperLaplaceDPOptimizer for laplace-paper); ``criterion``: the
    loss to call (Opacus's ``DPLossFastGradientClipping`` wrapper for grad_sample_mode ``ghost``);
    ``data_loader``: a Poisson DPDataLoader for DP schemes. ``sample_rate`` is the q every step is accounted at and
    ``steps_planned`` the steps the noise was calibrated for. Use ``plain_module`` (inside
    ``hooks_off()`` when the model is in training mode) for evaluation, Captum and model logging.
    """

    scheme: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    criterion: Any
    target_epsilon: float | None = None
    delta: float | None = None  # the δ of the guarantee (laplace-paper: of the nominal calibration only)
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps_planned: int | None = None
    accountant: str | None = None
    engine: PrivacyEngine | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ objects

    @property
    def is_dp(self) -> bool:
        """True for the schemes trained with per-example clipping (clip-only, gaussian, laplace, laplace-paper)."""
        return self.scheme in CLIPPED_SCHEMES

    @property
    def guaranteed(self) -> bool:
        """False for laplace-paper: noise without a guarantee (no ε at all)."""
        return self.scheme not in UNGUARANTEED_SCHEMES

    @property
    def trained_parameters(self) -> int:
        """d: the number of parameters this setup trains (those Opacus clips and noises in a DP scheme)."""
        return sum(p.numel() for p in self.plain_module.parameters() if p.requires_grad)

    @property
    def plain_module(self) -> nn.Module:
        """The underlying ``nn.Module`` without the GradSampleModule wrapper
        (Opacus hooks stay on it: see ``hooks_off``)."""
        m = self.module
        return m._module if isinstance(m, AbstractGradSampleModule) else m

    @contextmanager
    def hooks_off(self) -> Iterator[nn.Module]:
        """Yield ``plain_module`` with Opacus's per-sample-gradient hooks disabled, restoring them after.

        ``plain_module`` shares its submodules with the GradSampleModule, whose hooks stay registered
        on them and fire in training mode with gradients enabled; use this around anything that runs
        the plain model outside the training step (Captum, model logging/export, evaluation in train mode).
        """
        m = self.module
        toggles = hasattr(m, "disable_hooks") and hasattr(m, "hooks_enabled")
        was_enabled = toggles and m.hooks_enabled
        if toggles:
            m.disable_hooks()
        try:
            yield self.plain_module
        finally:
            if was_enabled:
                m.enable_hooks()

    def release(self) -> nn.Module:
        """Detach Opacus from the model for good and return the plain module.

        Removes the GradSampleModule's hooks and the per-sample attributes on the parameters
        (Opacus' ``to_standard_module``). The ledger stays readable; the setup cannot train afterwards.
        """
        m = self.module
        return m.to_standard_module() if isinstance(m, AbstractGradSampleModule) else m

    @property
    def ledger(self):
        """The privacy ledger (an Opacus ``IAccountant``), or None for non-DP schemes."""
        return self.engine.accountant if self.engine is not None else None

    @property
    def steps_taken(self) -> int:
        """Optimizer steps recorded in the ledger so far (0 for non-DP schemes)."""
        return sum(int(t) for _, _, t in self.ledger.history) if self.ledger is not None else 0

    def check_loader(self, loader: Any) -> None:
        """Raise UserError unless ``loader`` samples with Poisson sampling (required for every DP scheme)."""
        if self.is_dp and not _is_poisson(loader):
            raise UserError(
                f"scheme {self.scheme!r} needs the Poisson-sampling loader from make_private "
                f"(setup.data_loader); got {type(loader).__name__} without Poisson sampling"
            )

    # ------------------------------------------------------------------ privacy

    def epsilon(self) -> float | None:
        """ε spent so far at δ, from the ledger of steps actually taken;
        ``inf`` when not private, 0.0 before any step, None for laplace-paper (no guarantee: no ε)."""
        if self.scheme == "gaussian":
            return accounting.gaussian_epsilon_history(self.ledger.history, self.delta, self.accountant)
        if self.scheme == "laplace":
            return self.ledger.get_epsilon(self.delta)
        if not self.guaranteed:
            return None
        return math.inf

    def state_dict(self) -> dict[str, Any]:
        """The ledger's state (Opacus accountant format ``{"history": [(noise, q, steps), ...], "mechanism": ...}``).

        Plain Python lists/tuples/floats: loads with ``torch.load(weights_only=True)``.
        """
        if self.ledger is None:
            return {"history": [], "mechanism": "none"}
        state = self.ledger.state_dict()
        return {
            "history": [(float(s), float(q), int(t)) for s, q, t in state["history"]],
            "mechanism": state["mechanism"],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the ledger of an interrupted run into this fresh setup (never resets one that counted steps).

        Raises UserError for a DP scheme when ``state`` is missing or empty, is another mechanism's
        ledger, or when this setup's ledger already counts steps.
        """
        if self.ledger is None:
            return
        if not state or "history" not in state or "mechanism" not in state:
            raise UserError(
                f"the checkpoint has no privacy ledger, so the {self.scheme} run cannot resume without resetting ε; "
                "start the run again from scratch"
            )
        mech = self.ledger.mechanism()
        if state["mechanism"] != mech:
            raise UserError(
                f"the checkpoint's privacy ledger is {state['mechanism']!r} but this {self.scheme} run uses {mech!r}; "
                "resume with the checkpoint's scheme and accountant"
            )
        if self.steps_taken > 0:
            raise UserError(
                f"refusing to overwrite a privacy ledger that already counts {self.steps_taken} steps; "
                "load the checkpoint into a fresh setup"
            )
        history = [(float(s), float(q), int(t)) for s, q, t in state["history"]]
        self.ledger.load_state_dict({"history": history, "mechanism": mech})

    def report(self) -> dict[str, Any]:
        """Privacy fields of the run (PrivacyReport.as_dict(): JSON-safe, ε = ∞ becomes None).

        laplace-paper: ``guarantee: "none"`` and its reason, no ε, no target ε and no δ; the ε its σ was
        calibrated from under ``nominal_epsilon`` (with ``nominal_delta`` and ``nominal_accountant``), and the
        valid but useless bound for L1 sensitivity C·√d under ``epsilon_l1_bound``.
        """
        if not self.guaranteed:
            return self._unguaranteed_report()
        steps = self.steps_taken
        rep = accounting.PrivacyReport(
            scheme=self.scheme,
            target_epsilon=self.target_epsilon,
            epsilon=self.epsilon(),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant=self.accountant,
            steps_planned=self.steps_planned,
            extra=dict(self.extra),
        )
        if self.scheme == "gaussian":
            rep.epsilon_rdp_check = accounting.gaussian_epsilon_rdp_dp_accounting_history(
                self.ledger.history, self.delta
            )
        elif self.scheme == "laplace":
            rep.step_epsilon = accounting.laplace_step_epsilon(self.noise_multiplier)
            rep.step_epsilon_amplified = accounting.laplace_amplified_step_epsilon(
                self.noise_multiplier, self.sample_rate
            )
            rep.epsilon_composition_bound = accounting.laplace_composition_bound(self.ledger.history, self.delta)
        if self.scheme in ("gaussian", "laplace"):
            rep.guarantee = "dp"
            rep.noise_scale = self.noise_multiplier * self.max_grad_norm
        return rep.as_dict()

    def _unguaranteed_report(self) -> dict[str, Any]:
        d = self.trained_parameters
        steps = self.steps_taken
        bound = accounting.l2_laplace_epsilon_bound(
            self.noise_multiplier, self.sample_rate, max(steps, 1), self.delta, d
        )
        extra = {k: v for k, v in self.extra.items() if not k.startswith("nominal_")}
        rep = accounting.PrivacyReport(
            scheme=self.scheme,
            target_epsilon=None,
            epsilon=math.inf,  # as_dict: null; guarantee "none" says why
            delta=None,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant=None,
            steps_planned=self.steps_planned,
            guarantee="none",
            guarantee_reason=GUARANTEE_REASON.format(
                d=d, sigma=self.noise_multiplier, eps=self.extra["nominal_epsilon"], delta=self.delta, bound=bound
            ),
            noise_scale=self.noise_multiplier * self.max_grad_norm,
            nominal_epsilon=self.extra["nominal_epsilon"],
            nominal_delta=self.delta,
            nominal_accountant=self.extra["nominal_accountant"],
            epsilon_l1_bound=bound,
            extra=extra,
        )
        return rep.as_dict()


def _check_positive(value: Any, name: str, how: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a finite number > 0, got {value!r}; {how}")
    return float(value)


def _new_engine(accountant: str, secure_mode: bool) -> DPCamPrivacyEngine:
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
    ``ghost``. Raises UserError for bad input (unknown scheme/accountant/mode, ε ≤ 0, δ ∉ (0, 1), C ≤ 0,
    epochs < 1, a non-Poisson request for a DP scheme, an incompatible model, an unreachable target)
    and warns when δ ≥ 1/N.
    """
    if scheme not in SCHEMES:
        raise UserError(f"unknown privacy scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    accounting.check_accountant(accountant)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    if scheme not in CLIPPED_SCHEMES:
        return PrivateSetup(
            scheme=scheme, module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion
        )
    target_epsilon, delta, max_grad_norm = _validate(
        scheme, target_epsilon, delta, max_grad_norm, epochs, grad_sample_mode, poisson_sampling, data_loader
    )
    sample_rate, steps_per_epoch, steps_planned = poisson_plan(len(data_loader), epochs)
    noise, clipping, ledger_name, accountant_name = _calibrate(
        scheme, target_epsilon, delta, sample_rate, steps_planned, accountant
    )
    extra: dict[str, Any] = {}
    if scheme in UNGUARANTEED_SCHEMES:
        warnings.warn(NO_GUARANTEE, UserWarning, stacklevel=2)
        extra = {"nominal_epsilon": target_epsilon, "nominal_accountant": accountant}
    if noise_generator is not None and secure_mode:
        raise UserError("a seeded noise generator cannot be used in secure mode; drop the seed or secure mode")
    engine = _new_engine(ledger_name, secure_mode)
    dp_module, dp_optimizer, criterion, dp_loader = _wrap(
        engine,
        module,
        optimizer,
        criterion,
        data_loader,
        noise=noise,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
    )
    if len(dp_loader) != steps_per_epoch or not math.isclose(1 / len(dp_loader), sample_rate):
        raise RuntimeError(  # internal: our plan must match what Opacus built and accounts
            f"Poisson plan mismatch: planned {steps_per_epoch} batches at q={sample_rate}, "
            f"Opacus built {len(dp_loader)}"
        )
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
) -> tuple[float | None, float, float]:
    """Check a clipped scheme's settings (one-line UserErrors); warn when δ ≥ 1/N. Returns (ε, δ, C) as floats."""
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
    if delta >= 1 / n:
        msg = (
            f"δ={delta:g} ≥ 1/N = {1 / n:.3g} for N={n} training examples: "
            "this guarantee allows leaking one example outright; use δ < 1/N"
        )
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
