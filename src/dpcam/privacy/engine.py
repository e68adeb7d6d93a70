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

Precision (``make_private(..., precision="bf16")``, opt-in; ``fp32`` is the default and leaves every object
exactly as Opacus builds it): the training step's forward pass and loss run under
``torch.autocast(device, dtype=torch.bfloat16)`` (``setup.autocast()``, or ``precision_context``), which lowers
only the matmul/conv activations; the parameters, their gradients, the optimizer state and the noise stay float32.
Under autocast Opacus's hooks capture bfloat16 activations and backprops, so ``p.grad_sample`` is bfloat16, and
``DPOptimizer.clip_and_accumulate`` would then form the per-sample norms and clipping factors in bfloat16 (8-bit
mantissa: a clipped per-example gradient reaches 1.006·C, measured). The bf16 optimizers here
(``Float32ClippingMixin``) clip the exact float32 upcasts of the per-sample gradients with norms accumulated in
float64 and factors rounded down to float32 (``clip_factors``), so every clipped per-example gradient has norm
≤ C, and the clipped sum and the noise are float32, as in a float32 run. Ghost clipping is refused under bf16: its
norms come from bfloat16 activations and its clipped gradients from a second bfloat16 backward pass, so no float32
per-example gradient is ever clipped.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, GRAD_SAMPLE_MODES, NOISED_SCHEMES, PRECISIONS, SCHEMES, UNGUARANTEED_SCHEMES
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

BF16_GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the modes whose per-example gradients bf16 can clip exactly
BF16_REFUSED = {
    "ghost": "ghost clipping never forms a per-example gradient: under bfloat16 autocast its norms come from "
    "bfloat16 activations and backprops and the clipped gradients from a second bfloat16 backward pass, so the "
    "clipping bound C cannot be made exact",
    "ew": "Opacus's expanded-weights mode fails under autocast (its linear layers mix bfloat16 and float32)",
}

__all__ = [
    "PRECISIONS",
    "DPCamPrivacyEngine",
    "Float32ClippingMixin",
    "Float32DPOptimizer",
    "Float32LaplaceDPOptimizer",
    "Float32PaperLaplaceDPOptimizer",
    "LaplaceLedger",
    "PrivateSetup",
    "make_private",
    "clip_factors",
    "native_bf16",
    "precision_context",
]


# ---------------------------------------------------------------------------------------------- precision


def _check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def precision_context(device: torch.device | str, precision: str = "fp32") -> AbstractContextManager:
    """The context a training step's forward pass and loss run in: ``torch.autocast(device, bfloat16)`` for
    ``"bf16"``, a no-op for ``"fp32"``.

    Autocast lowers the matmul/conv inputs and outputs (activations) to bfloat16 and keeps float32 where PyTorch
    lists an op as precision-sensitive (the cross-entropy loss); the parameters, their gradients, the optimizer
    state and the privacy noise stay float32. Call ``loss.backward()`` after the block, as PyTorch recommends.
    """
    if _check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def native_bf16(device: torch.device | str = "cpu") -> bool | None:
    """Whether ``device`` computes bfloat16 matmuls in hardware: a CUDA GPU that supports bf16, a Linux CPU with
    AVX512-BF16 or AMX-BF16 (without them oneDNN emulates bf16 and autocast is slower than float32).
    None where it cannot tell (a CPU outside Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def clip_factors(grad_samples: list[torch.Tensor], max_grad_norm: float, norm_type: int) -> torch.Tensor:
    """Per-example clipping factors min(1, C / (‖g_i‖ + 1e-6)) of any-precision per-sample gradients, as float32
    numbers never above the exact factor.

    ``‖g_i‖`` is the flat L``norm_type`` norm of example i's gradient over all the parameters, accumulated in float64
    from the exact float64 values of ``grad_samples`` (bfloat16 and float32 convert exactly), and the factor is
    formed in float64 and then rounded towards zero to float32. So the clipped gradient f_i·g_i of the float32
    values that are summed has norm f_i·‖g_i‖ ≤ C·‖g_i‖ / (‖g_i‖ + 1e-6) < C up to float64 rounding (10⁻¹⁵).
    Measured on smallcnn: Opacus's float32 norms (an fp32 run's) of the upcast bfloat16-valued gradients would leave
    clipped gradients up to 9·10⁻⁷·C above C (float32 sums of their exact squares undershoot by about 3·10⁻⁷), and
    its bfloat16 norms (Opacus under autocast) up to 0.6 % above.
    """
    if len(grad_samples[0]) == 0:  # empty Poisson batch
        return torch.zeros((0,), device=grad_samples[0].device)
    device = grad_samples[0].device
    per_param = [
        torch.linalg.vector_norm(g.reshape(len(g), -1), ord=norm_type, dim=1, dtype=torch.float64).to(device)
        for g in grad_samples
    ]
    norms = torch.linalg.vector_norm(torch.stack(per_param, dim=1), ord=norm_type, dim=1)
    exact = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    rounded = exact.to(torch.float32)
    return torch.where(rounded.double() > exact, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded)


class Float32ClippingMixin:
    """Mixin for an Opacus ``DPOptimizer`` (first base) of a bf16 run: ``clip_and_accumulate`` clips per-sample
    gradients of any precision (bfloat16 under autocast with grad_sample_mode hooks) as float32 values.

    Each ``p.grad_sample`` is upcast to the parameter's float32 (exact), the factors come from ``clip_factors``
    (norms accumulated in float64, factors rounded down to float32), and ``p.summed_grad`` = Σ_i f_i·g_i is formed
    in float32, so ``add_noise`` (the base class's: Gaussian, or Laplace for the laplace schemes) draws float32
    noise like ``p.summed_grad`` and adds it in float32. Everything else (``pre_step``, ``scale_grad``, the
    accountant's step hook, zero_grad) is the base class's. ``norm_type``: 2 (Opacus's flat L2 clipping) or 1
    (``LaplaceDPOptimizer``'s L1 clipping).
    """

    norm_type = 2

    def clip_and_accumulate(self) -> None:
        factors = clip_factors(self.grad_samples, self.max_grad_norm, self.norm_type)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors.to(device=grad_sample.device, dtype=p.dtype), grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


class Float32DPOptimizer(Float32ClippingMixin, DPOptimizer):
    """Opacus's ``DPOptimizer`` (flat L2 clipping, Gaussian noise) for bf16 runs: float32 clipping (the mixin)."""


class Float32LaplaceDPOptimizer(Float32ClippingMixin, LaplaceDPOptimizer):
    """``LaplaceDPOptimizer`` (L1 clipping, Laplace noise) for bf16 runs: float32 clipping (the mixin) in L1."""

    norm_type = 1


class Float32PaperLaplaceDPOptimizer(Float32ClippingMixin, PaperLaplaceDPOptimizer):
    """``PaperLaplaceDPOptimizer`` (laplace-paper, no guarantee) for bf16 runs: float32 L2 clipping (the mixin)."""


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
        if clipping in (L1_CLIPPING, L2_LAPLACE_CLIPPING):
            if distributed:
                raise UserError("the laplace schemes do not support distributed training; train on one device")
            if grad_sample_mode.startswith("ghost"):
                raise UserError(
                    "the laplace schemes need per-example gradients; use grad_sample_mode hooks, ew or functorch"
                )
            if clipping == L1_CLIPPING:
                cls = Float32LaplaceDPOptimizer if bf16 else LaplaceDPOptimizer
            else:
                cls = Float32PaperLaplaceDPOptimizer if bf16 else PaperLaplaceDPOptimizer
        elif clipping == "flat" and not distributed and grad_sample_mode in BF16_GRAD_SAMPLE_MODES:
            cls = Float32DPOptimizer  # what Opacus's get_optimizer_class picks (DPOptimizer), clipping in float32
        else:
            raise UserError(
                f"precision bf16 supports flat clipping on one device with grad_sample_mode "
                f"{' or '.join(BF16_GRAD_SAMPLE_MODES)}, not clipping {clipping!r}, grad_sample_mode "
                f"{grad_sample_mode!r}{', distributed' if distributed else ''}; use precision fp32"
            )
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


@dataclass
class PrivateSetup:
    """What training needs for one scheme, plus its privacy ledger.

    ``module``: a GradSampleModule for DP schemes (the plain module otherwise); ``optimizer``: a
    DPOptimizer (LaplaceDPOptimizer for laplace, PaperLaplaceDPOptimizer for laplace-paper); ``criterion``: the
    loss to call (Opacus's ``DPLossFastGradientClipping`` wrapper for grad_sample_mode ``ghost``);
    ``data_loader``: a Poisson DPDataLoader for DP schemes. ``sample_rate`` is the q every step is accounted at and
    ``steps_planned`` the steps the noise was calibrated for. Use ``plain_module`` (inside
    ``hooks_off()`` when the model is in training mode) for evaluation, Captum and model logging.
    ``precision``: ``"fp32"`` or ``"bf16"``; run each training step's forward pass and loss inside
    ``autocast()`` (a no-op for fp32).
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
    precision: str = "fp32"

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

    def autocast(self) -> AbstractContextManager:
        """The context of a training step's forward pass and loss (``precision_context`` on the model's device):
        bfloat16 autocast for precision bf16, a no-op for fp32. ``loss.backward()`` and ``optimizer.step()`` go
        after it; evaluation and Captum run without it (float32)."""
        p = next(self.plain_module.parameters(), None)
        return precision_context(p.device if p is not None else "cpu", self.precision)

    def average_views(self, k: int) -> None:
        """Augmentation multiplicity (De et al. 2022): after ``loss.backward()`` on a batch of B examples × ``k``
        views (view-major per example, :func:`dpcam.data.augment.views`), make each trained parameter's
        per-sample gradients (B·k, …) the mean over each example's ``k`` views (B, …), so the optimizer clips
        one gradient per example: the sensitivity, the Poisson rate and the accounting are those of B examples.
        Non-DP schemes need nothing (their loss already averages the views)."""
        if k == 1 or not self.is_dp:
            return
        if isinstance(self.module, GradSampleModuleFastGradientClipping):
            raise UserError("augmentation multiplicity needs per-example gradients: use grad_sample_mode hooks")
        for p in self.plain_module.parameters():
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            if not isinstance(g, torch.Tensor) or g.shape[0] % k:
                raise RuntimeError(f"per-sample gradients of {g.shape[0]} rows are not {k} views per example")
            p.grad_sample = g.view(g.shape[0] // k, k, *g.shape[1:]).mean(dim=1)

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
    if scheme not in SCHEMES:
        raise UserError(f"unknown privacy scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    accounting.check_accountant(accountant)
    _check_precision(precision)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    if precision == "bf16":
        _validate_bf16(module, scheme, grad_sample_mode)
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
    extra: dict[str, Any] = {}
    if scheme in UNGUARANTEED_SCHEMES:
        warnings.warn(NO_GUARANTEE, UserWarning, stacklevel=2)
        extra = {"nominal_epsilon": target_epsilon, "nominal_accountant": accountant}
    if noise_generator is not None and secure_mode:
        raise UserError("a seeded noise generator cannot be used in secure mode; drop the seed or secure mode")
    engine = _new_engine(ledger_name, secure_mode)
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


def _check_plan(dp_loader: DataLoader, steps_per_epoch: int, sample_rate: float) -> None:
    """Internal check: our Poisson plan (what the accountant is told) must match what Opacus built."""
    if len(dp_loader) != steps_per_epoch or not math.isclose(1 / len(dp_loader), sample_rate):
        raise RuntimeError(
            f"Poisson plan mismatch: planned {steps_per_epoch} batches at q={sample_rate}, "
            f"Opacus built {len(dp_loader)}"
        )


def _validate_bf16(module: nn.Module, scheme: str, grad_sample_mode: str) -> None:
    """Refuse what bf16 cannot train exactly (UserError); log a warning when the device emulates bfloat16."""
    if scheme in CLIPPED_SCHEMES and grad_sample_mode in BF16_REFUSED:
        raise UserError(
            f"precision bf16 with grad_sample_mode {grad_sample_mode}: {BF16_REFUSED[grad_sample_mode]}; "
            f"use grad_sample_mode {' or '.join(BF16_GRAD_SAMPLE_MODES)}, or precision fp32"
        )
    low = sorted({str(p.dtype) for p in module.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise UserError(
            f"precision bf16 keeps the trained parameters in float32 (autocast lowers only activations), but the "
            f"model has {', '.join(low)} parameters; build it in float32"
        )
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if native_bf16(device) is False:
        logger.warning(
            "precision bf16 on a %s without native bfloat16 (AVX512-BF16 or AMX on a CPU): oneDNN emulates it, and "
            "a step is several times slower than in float32",
            device.type.upper(),
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
