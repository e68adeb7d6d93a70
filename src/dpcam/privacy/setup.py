"""What training uses of a private model: ``PrivateSetup``, the objects to train with and the privacy ledger.

``make_private(...)`` (:mod:`dpcam.privacy.engine`) builds it. It holds the model, optimizer, loader and loss to
train with, the privacy ledger of the steps actually taken (Opacus's accountant for ``gaussian``/``clip-only``,
``LaplaceLedger`` for ``laplace``), ``epsilon()``, ``state_dict()``/``load_state_dict()`` of the ledger,
``report()``, ``plain_module`` (the bare ``nn.Module``, for evaluation and Captum) with ``hooks_off()`` and
``release()``, and ``autocast()`` for precision bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule, GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, UNGUARANTEED_SCHEMES
from dpcam.privacy import accounting
from dpcam.privacy.precision import precision_context

GUARANTEE_REASON = (
    "L2 clipping bounds a per-example gradient's L1 sensitivity only by C·√d (d = {d} trained parameters), so "
    "Laplace noise of scale σ·C (σ = {sigma:.4g}, Opacus's Gaussian noise multiplier for the nominal ε = {eps:g} "
    "at δ = {delta:g}) gives no useful ε: the only valid bound, for L1 sensitivity C·√d, is ε ≤ {bound:.4g}"
)

__all__ = ["PrivateSetup"]


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
