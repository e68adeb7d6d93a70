"""Laplace DP-SGD as an Opacus extension: per-example L1 clipping, Laplace noise, and its own ledger.

``LaplaceDPOptimizer`` subclasses ``opacus.optimizers.DPOptimizer`` and overrides only the two DP steps
(``clip_and_accumulate``, ``add_noise``); zero_grad, step skipping (virtual batches), the
expected-batch-size normalisation (``scale_grad``) and the accounting step hook are Opacus's.

``LaplaceLedger`` is an ``opacus.accountants.IAccountant`` registered in Opacus's accountant registry
under ``"laplace-pld"``, so ``PrivacyEngine(accountant="laplace-pld")`` counts the steps actually taken
through Opacus's own optimizer hook, while Opacus's Gaussian accountants (RDP/PRV/GDP, which assume
Gaussian noise) never see a Laplace step. Its ε is dp_accounting's PLD (``accounting.laplace_epsilon``).

Why L1: Laplace noise of scale b per coordinate is (Δ₁/b)-DP where Δ₁ is the L1 sensitivity. Clipping
per-example gradients to L1 norm C bounds Δ₁ = C (add/remove one example), so scale λC gives 1/λ per
step. An L2 clip C only bounds Δ₁ ≤ √d·C for d parameters, so L2 clipping with noise λC has no useful
guarantee.

That unguaranteed mechanism is also here, labelled as such: ``PaperLaplaceDPOptimizer`` is the scheme
``laplace-paper``, the most plausible reading of Naidu et al.'s Table 2 (Opacus's L2 clipping, its Gaussian σ
calibrated for the target ε, and the normal draw N(0, (σC)²) replaced by a Laplace draw of the same scale
parameter b = σC). Its ``NoGuaranteeLedger`` counts the steps (for resuming and the record) and refuses to give
an ε (docs/privacy.md).
"""

from __future__ import annotations

import math

import torch
from opacus.accountants import IAccountant, register_accountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from dpcam.errors import UserError
from dpcam.privacy.accounting import laplace_epsilon_history

LEDGER_MECHANISM = "laplace-pld"
PAPER_LEDGER_MECHANISM = "laplace-paper-none"  # laplace-paper's ledger: steps counted, no ε
NO_GUARANTEE = (
    "laplace-paper has no privacy guarantee: L2 clipping bounds a gradient's L1 norm, what Laplace noise needs, "
    "only by C·√d, so Laplace noise of scale σ·C (σ: the Gaussian noise multiplier of the nominal ε) gives no "
    "useful ε; it replicates what the paper measured, not what it claimed"
)


def generate_laplace_noise(
    scale: float, reference: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """i.i.d. Laplace(0, ``scale``) noise shaped like ``reference`` (same dtype and device).

    Drawn as ``scale·(E₁ − E₂)`` with E₁, E₂ ~ Exp(1) from ``generator`` (a seeded
    ``torch.Generator`` on ``reference``'s device makes it reproducible). Returns zeros for scale 0.
    Note: like every floating-point Laplace sampler without snapping (Mironov 2012), the low-order
    bits of the output are not perfectly private; ``secure_mode`` only swaps in a CSPRNG.
    """
    if scale == 0:
        return torch.zeros_like(reference)
    e = torch.empty((2, *reference.shape), device=reference.device, dtype=reference.dtype)
    e.exponential_(generator=generator)
    return (e[0] - e[1]).mul_(scale)


class LaplaceDPOptimizer(DPOptimizer):
    """DPOptimizer with per-example **L1** clipping to ``max_grad_norm`` C and Laplace noise of scale λ·C.

    ``noise_multiplier`` is λ. One step, before Opacus's scaling:
    ``g = Σ_i clip_L1(g_i, C) + Laplace(0, λC)^d`` (per-sample L1 norm over all parameters, flat, like
    Opacus's flat L2 clipping); then ``scale_grad`` divides by ``expected_batch_size`` (loss_reduction
    "mean"), exactly as DPOptimizer does for Gaussian noise.
    """

    def clip_and_accumulate(self) -> None:
        """Clip each per-sample gradient to L1 norm ≤ C (over all parameters) and sum into ``p.summed_grad``."""
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:  # empty Poisson batch
            clip_factor = torch.zeros((0,), device=grad_samples[0].device)
        else:
            device = grad_samples[0].device
            per_param = [g.reshape(len(g), -1).abs().sum(dim=1).to(device) for g in grad_samples]
            l1 = torch.stack(per_param, dim=1).sum(dim=1)  # (B,)
            clip_factor = (self.max_grad_norm / (l1 + 1e-6)).clamp(max=1.0)

        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            factor = clip_factor.to(device=grad_sample.device, dtype=p.dtype)
            grad = torch.einsum("i,i...", factor, grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + Laplace(0, λ·C)`` per coordinate, drawn from the optimizer's generator."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = generate_laplace_noise(self.noise_multiplier * self.max_grad_norm, p.summed_grad, self.generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class PaperLaplaceDPOptimizer(DPOptimizer):
    """The paper's replica (scheme ``laplace-paper``, **no guarantee**): Opacus's flat per-example **L2** clipping to
    ``max_grad_norm`` C, unchanged, and Laplace noise of scale b = σ·C per coordinate in place of Opacus's
    N(0, (σC)²), with σ = ``noise_multiplier`` (Opacus's Gaussian σ for the nominal ε).

    Only ``add_noise`` differs from ``DPOptimizer``: clipping, accumulation, the expected-batch-size
    normalisation and the accounting hook are Opacus's. The L1 sensitivity of the clipped sum is only bounded
    by C·√d (d trained parameters): against it, noise of scale σ·C is √d times too small for any useful ε.
    """

    add_noise = LaplaceDPOptimizer.add_noise


class LaplaceLedger(IAccountant):
    """Privacy ledger of Laplace DP-SGD: history ``[(λ, q, steps), ...]`` of the steps actually taken.

    Same contract as Opacus's accountants (``step``, ``get_epsilon``, ``state_dict``/``load_state_dict``,
    ``history``), with ε from dp_accounting's PLD accountant. Never reset: ``load_state_dict`` is for a
    fresh ledger (resume) and refuses to overwrite one that has already counted steps.
    """

    def __init__(self):
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one optimizer step with Laplace noise multiplier λ at Poisson sampling rate q."""
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            lam, q, t = self.history[-1]
            self.history[-1] = (lam, q, t + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(t for _, _, t in self.history)

    def get_epsilon(self, delta: float, **kwargs) -> float:
        """ε spent so far at ``delta`` (PLD, pessimistic discretisation); 0.0 before any step."""
        return laplace_epsilon_history(self.history, delta)

    def load_state_dict(self, state_dict) -> None:
        """Restore a ledger saved by ``state_dict()``; refused (UserError) if this ledger already counted steps."""
        if self.steps > 0:
            raise UserError(
                f"refusing to overwrite a privacy ledger that already counts {self.steps} steps; "
                "load the checkpoint into a fresh setup"
            )
        try:
            super().load_state_dict(state_dict)
        except ValueError as err:
            raise UserError(f"invalid Laplace privacy ledger in checkpoint: {err}") from err
        self.history = [(float(lam), float(q), int(t)) for lam, q, t in self.history]
        for lam, q, t in self.history:
            if not (lam >= 0 and 0 < q <= 1 and t >= 0 and math.isfinite(lam)):
                raise UserError(f"invalid Laplace privacy ledger in checkpoint: entry {(lam, q, t)}")

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return LEDGER_MECHANISM


register_accountant(LEDGER_MECHANISM, LaplaceLedger, force=True)


class NoGuaranteeLedger(LaplaceLedger):
    """The ledger of ``laplace-paper``: history ``[(σ, q, steps), ...]`` of the steps taken, and no ε.

    An Opacus ``IAccountant`` registered as ``"laplace-paper-none"``, so the replica's steps are counted through
    Opacus's optimizer hook (a resumed run keeps its step count) while no Gaussian accountant ever counts a
    Laplace step and nothing can read an ε off it: ``get_epsilon`` refuses.
    """

    def get_epsilon(self, delta: float, **kwargs) -> float:
        raise UserError(NO_GUARANTEE)

    @classmethod
    def mechanism(cls) -> str:
        return PAPER_LEDGER_MECHANISM


register_accountant(PAPER_LEDGER_MECHANISM, NoGuaranteeLedger, force=True)
