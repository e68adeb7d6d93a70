"""bf16 training with exact per-example clipping: the autocast context and the float32-clipping optimizers.

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
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, PRECISIONS
from dpcam.privacy.laplace import LaplaceDPOptimizer, PaperLaplaceDPOptimizer

logger = logging.getLogger(__name__)

BF16_GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the modes whose per-example gradients bf16 can clip exactly
BF16_REFUSED = {
    "ghost": "ghost clipping never forms a per-example gradient: under bfloat16 autocast its norms come from "
    "bfloat16 activations and backprops and the clipped gradients from a second bfloat16 backward pass, so the "
    "clipping bound C cannot be made exact",
    "ew": "Opacus's expanded-weights mode fails under autocast (its linear layers mix bfloat16 and float32)",
}

__all__ = [
    "Float32ClippingMixin",
    "Float32DPOptimizer",
    "Float32LaplaceDPOptimizer",
    "Float32PaperLaplaceDPOptimizer",
    "clip_factors",
    "native_bf16",
    "precision_context",
]


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
