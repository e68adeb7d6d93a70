"""bfloat16 training (make_private(precision="bf16")): the per-example clipping bound stays exact.

Under ``torch.autocast("cpu", bfloat16)`` Opacus's hooks give bfloat16 per-sample gradients. These tests capture
what the optimizer really clips: every call ``torch.einsum("i,i...", factors, grad_sample)`` of a step (the one
place Opacus's, dpcam's Laplace and dpcam's bf16 clipping form Σ_i f_i·g_i), so the float32 per-sample
gradients g_i and the factors f_i checked below are the very tensors that were summed.
"""

import logging

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from dpcam.errors import UserError
from dpcam.models import create_model
from dpcam.privacy.engine import make_private
from dpcam.privacy.laplace import LaplaceDPOptimizer, PaperLaplaceDPOptimizer
from dpcam.privacy.precision import (
    Float32DPOptimizer,
    Float32LaplaceDPOptimizer,
    Float32PaperLaplaceDPOptimizer,
    clip_factors,
    precision_context,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook"),
    pytest.mark.filterwarnings("ignore:laplace-paper has no privacy guarantee"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
]

N, BATCH, SIZE, CLASSES = 256, 64, 8, 4
CLIP = {"clip-only": 0.05, "gaussian": 0.05, "laplace": 2.0, "laplace-paper": 0.05}  # most examples are clipped
NORM = {"laplace": 1}  # L1 for dpcam's Laplace scheme; L2 for the others
OPTIMIZER = {
    "clip-only": Float32DPOptimizer,
    "gaussian": Float32DPOptimizer,
    "laplace": Float32LaplaceDPOptimizer,
    "laplace-paper": Float32PaperLaplaceDPOptimizer,
}


@pytest.fixture(autouse=True)
def _quiet_bf16_warning(caplog):
    caplog.set_level(logging.ERROR, logger="dpcam.privacy.precision")  # "no native bfloat16" on CPUs without it


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _setup(scheme, precision, *, mode="hooks", clip=None, epochs=1, seed=0):
    x, y = _data()
    model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return make_private(
        model,
        opt,
        DataLoader(TensorDataset(x, y), batch_size=BATCH),
        scheme=scheme,
        target_epsilon=5.0,
        delta=1e-5,
        max_grad_norm=clip if clip is not None else CLIP[scheme],
        epochs=epochs,
        accountant="rdp",
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(seed + 1),
        precision=precision,
    )


def _backward(setup, xb, yb, autocast=None):
    setup.optimizer.zero_grad(set_to_none=True)
    with setup.autocast() if autocast is None else autocast:
        loss = setup.criterion(setup.module(xb), yb)
    loss.backward()


def _step_capturing(setup, monkeypatch):
    """optimizer.step(), returning every (factors, grad_sample) pair it passed to einsum("i,i...")."""
    calls, einsum = [], torch.einsum

    def spy(equation, *operands):
        if equation == "i,i...":
            calls.append(tuple(t.detach().clone() for t in operands))
        return einsum(equation, *operands)

    with monkeypatch.context() as m:
        m.setattr(torch, "einsum", spy)
        setup.optimizer.step()
    return calls


def _clipped_norms(calls, norm_type):
    """float64 norms of every example's clipped gradient f_i·g_i, over all parameters."""
    per_param = [
        torch.linalg.vector_norm(f.double()[:, None] * g.double().reshape(len(g), -1), ord=norm_type, dim=1)
        for f, g in calls
    ]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), ord=norm_type, dim=1)


def _reference_sum(calls, clip, norm_type):
    """Σ_i min(1, C/(‖g_i‖ + 1e-6))·g_i per parameter, all in float64 from the float32 g_i, and Σ_i |f_i g_i|."""
    gs = [g.double() for _, g in calls]
    per_param = [torch.linalg.vector_norm(g.reshape(len(g), -1), ord=norm_type, dim=1) for g in gs]
    norms = torch.linalg.vector_norm(torch.stack(per_param, dim=1), ord=norm_type, dim=1)
    f = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", f, g) for g in gs], [torch.einsum("i,i...", f, g.abs()) for g in gs]


# ------------------------------------------------------------------------------------- the problem


def test_opacus_alone_clips_bfloat16_per_sample_gradients_above_c(monkeypatch):
    """Why the bf16 optimizers exist: Opacus's own DPOptimizer under autocast norms bfloat16 per-sample gradients
    in bfloat16, and its clipped per-example gradients exceed C by far more than float32 rounding."""
    setup = _setup("clip-only", "fp32")  # Opacus's DPOptimizer, unchanged
    assert type(setup.optimizer) is DPOptimizer
    x, y = _data()
    _backward(setup, x[:BATCH], y[:BATCH], autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert {p.grad_sample.dtype for p in setup.optimizer.params} == {torch.bfloat16}
    norms = _clipped_norms(_step_capturing(setup, monkeypatch), 2)
    assert norms.max().item() > CLIP["clip-only"] * (1 + 1e-4)


# ------------------------------------------------------------------------------------- bf16: exact clipping


@pytest.mark.parametrize(
    "scheme, mode",
    [
        ("clip-only", "hooks"),
        ("gaussian", "hooks"),
        ("gaussian", "functorch"),
        ("laplace", "hooks"),
        ("laplace-paper", "hooks"),
    ],
)
def test_bf16_clips_every_example_to_c_in_float32(scheme, mode, monkeypatch):
    setup = _setup(scheme, "bf16", mode=mode)
    assert type(setup.optimizer) is OPTIMIZER[scheme] and setup.precision == "bf16"
    clip, norm_type = CLIP[scheme], NORM.get(scheme, 2)
    x, y = _data()
    xb, yb = x[:BATCH], y[:BATCH]
    _backward(setup, xb, yb)
    if mode == "hooks":  # the case that needs the upcast: Opacus's hooks captured bfloat16 activations
        assert {p.grad_sample.dtype for p in setup.optimizer.params} == {torch.bfloat16}
    calls = _step_capturing(setup, monkeypatch)
    params = setup.optimizer.params
    assert len(calls) == len(params)
    assert all(f.dtype == torch.float32 and g.dtype == torch.float32 for f, g in calls)
    assert all(torch.equal(f, calls[0][0]) for f, _ in calls)  # one factor per example, over all parameters

    norms = _clipped_norms(calls, norm_type)
    assert norms.max().item() <= clip * (1 + 1e-6)
    factors = calls[0][0].double()
    clipped = factors < 1
    assert clipped.sum() > BATCH // 2  # the bound is exercised
    assert torch.allclose(norms[clipped], torch.full_like(norms[clipped], clip), rtol=1e-5)  # met, not undershot

    # the clipped sum: float32, equal to the float64 recomputation to float32 precision
    expected, magnitude = _reference_sum(calls, clip, norm_type)
    for p, ref, mag in zip(params, expected, magnitude):
        assert p.summed_grad.dtype == torch.float32 and p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert ((p.summed_grad.double() - ref).abs() <= 1e-5 * mag + 1e-12).all()


@pytest.mark.parametrize("scheme", ["gaussian", "laplace", "laplace-paper", "clip-only"])
def test_bf16_noise_is_float32_with_the_schemes_scale(scheme):
    setup = _setup(scheme, "bf16", clip=1.0)
    x, y = _data()
    _backward(setup, x[:BATCH], y[:BATCH])
    setup.optimizer.step()
    ebs = setup.optimizer.expected_batch_size
    noise = torch.cat([(p.grad.double() * ebs - p.summed_grad.double()).flatten() for p in setup.optimizer.params])
    assert all(p.grad.dtype == torch.float32 for p in setup.optimizer.params)
    scale = setup.noise_multiplier * setup.max_grad_norm  # σ·C (Gaussian std) or λ·C / σ·C (Laplace scale)
    if scheme == "clip-only":
        assert scale == 0 and noise.abs().max().item() < 1e-4
    elif scheme == "gaussian":
        assert noise.std().item() == pytest.approx(scale, rel=0.1)
        assert noise.abs().median().item() == pytest.approx(0.6745 * scale, rel=0.1)  # normal, not Laplace
    else:
        assert noise.abs().mean().item() == pytest.approx(scale, rel=0.1)  # E|Laplace(b)| = b
        assert noise.abs().median().item() == pytest.approx(0.6931 * scale, rel=0.1)  # b·ln 2


def test_bf16_empty_poisson_batch_is_noise_only():
    setup = _setup("gaussian", "bf16", clip=1.0)
    setup.optimizer.zero_grad(set_to_none=True)
    with setup.autocast():  # as dpcam.train does: an empty Poisson batch is still a step, noise only
        loss = setup.module(torch.zeros(0, 3, SIZE, SIZE)).sum() * 0.0
    loss.backward()
    before = [p.detach().clone() for p in setup.optimizer.params]
    setup.optimizer.step()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in setup.optimizer.params)
    assert all(not torch.equal(a, p) for a, p in zip(before, setup.optimizer.params))


@pytest.mark.slow
def test_bf16_optimizer_clips_float32_gradients_like_opacus():
    """Without autocast the bf16 optimizer gets float32 per-sample gradients and agrees with Opacus's DPOptimizer to
    float32 precision (its norms are float64-accumulated, its factors rounded down)."""
    x, y = _data()
    grads = []
    for precision in ("fp32", "bf16"):
        setup = _setup("gaussian", precision)
        _backward(setup, x[:BATCH], y[:BATCH], autocast=precision_context("cpu", "fp32"))
        setup.optimizer.step()
        grads.append([p.summed_grad.clone() for p in setup.optimizer.params])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_clip_factors_never_exceed_the_exact_factor():
    torch.manual_seed(0)
    gs = [torch.randn(200, 30, 7).to(torch.bfloat16), torch.randn(200, 5) * 1e-3]
    for norm_type, clip in ((2, 1.0), (1, 20.0), (2, 1e-3)):
        f = clip_factors(gs, clip, norm_type)
        assert f.dtype == torch.float32
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.double().reshape(200, -1), ord=norm_type, dim=1) for g in gs], 1),
            ord=norm_type,
            dim=1,
        )
        exact = (clip / (norms + 1e-6)).clamp(max=1.0)
        assert (f.double() <= exact).all() and torch.allclose(f.double(), exact, rtol=1e-6)
        assert (f.double() * norms <= clip).all()
    assert clip_factors([torch.zeros(0, 3)], 1.0, 2).shape == (0,)


# ------------------------------------------------------------------------------------- fp32: unchanged


def _opacus_reference_step(x, y, *, noise, clip, expected_batch_size):
    """One step of plain Opacus (its own PrivacyEngine and DPOptimizer), no dpcam code."""
    model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    module, dp_opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=noise,
        max_grad_norm=clip,
        noise_generator=torch.Generator().manual_seed(1),
    )
    assert dp_opt.expected_batch_size == expected_batch_size
    dp_opt.zero_grad(set_to_none=True)
    torch.nn.CrossEntropyLoss()(module(x[:BATCH]), y[:BATCH]).backward()
    dp_opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fp32_step_is_bit_identical_to_plain_opacus():
    x, y = _data()
    setup = _setup("gaussian", "fp32")
    assert type(setup.optimizer) is DPOptimizer and setup.precision == "fp32"
    _backward(setup, x[:BATCH], y[:BATCH])  # inside setup.autocast(): a no-op for fp32
    setup.optimizer.step()
    ours = [p.detach().clone() for p in setup.plain_module.parameters()]
    ebs = setup.optimizer.expected_batch_size
    ref = _opacus_reference_step(x, y, noise=setup.noise_multiplier, clip=CLIP["gaussian"], expected_batch_size=ebs)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("scheme", ["clip-only", "laplace", "laplace-paper"])
@pytest.mark.slow
def test_fp32_builds_the_same_optimizers_and_steps_as_without_the_option(scheme):
    x, y = _data()
    expected = {"clip-only": DPOptimizer, "laplace": LaplaceDPOptimizer, "laplace-paper": PaperLaplaceDPOptimizer}
    params = []
    for kwargs in ({}, {"precision": "fp32"}):
        model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=0)
        setup = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.5),
            DataLoader(TensorDataset(x, y), batch_size=BATCH),
            scheme=scheme,
            target_epsilon=5.0,
            delta=1e-5,
            max_grad_norm=CLIP[scheme],
            epochs=1,
            accountant="rdp",
            noise_generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        assert type(setup.optimizer) is expected[scheme]
        with setup.autocast():
            loss = setup.criterion(setup.module(x[:BATCH]), y[:BATCH])
        loss.backward()
        setup.optimizer.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_precision_context():
    assert not torch.is_autocast_enabled("cpu")
    with precision_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with precision_context(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3))
        assert y.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown precision"):
        precision_context("cpu", "fp16")


# ------------------------------------------------------------------------------------- ledger and refusals


@pytest.mark.parametrize("scheme", ["gaussian", "laplace"])
@pytest.mark.slow
def test_ledger_and_epsilon_do_not_depend_on_precision(scheme):
    out = {}
    for precision in ("fp32", "bf16"):
        setup = _setup(scheme, precision, clip=1.0, epochs=2)
        for xb, yb in setup.data_loader:
            _backward(setup, xb, yb)
            setup.optimizer.step()
        out[precision] = (setup.state_dict(), setup.epsilon(), setup.steps_taken)
    assert out["fp32"] == out["bf16"]
    assert out["bf16"][2] == len(setup.data_loader)


def test_none_and_ldp_take_the_precision_without_wrapping():
    x, y = _data()
    for scheme in ("none", "ldp"):
        model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        setup = make_private(model, opt, DataLoader(TensorDataset(x, y)), scheme=scheme, precision="bf16")
        assert setup.module is model and setup.optimizer is opt and setup.precision == "bf16"
        with setup.autocast():
            assert model(x[:2]).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp16"}, "unknown precision"),
        ({"precision": "bf16", "grad_sample_mode": "ghost"}, "ghost clipping never forms a per-example gradient"),
        ({"precision": "bf16", "grad_sample_mode": "ew"}, "expanded-weights"),
    ],
)
def test_bad_precision_settings_are_user_errors(kwargs, match):
    x, y = _data()
    model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=0)
    with pytest.raises(UserError, match=match):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(TensorDataset(x, y), batch_size=BATCH),
            scheme="gaussian",
            target_epsilon=1.0,
            delta=1e-5,
            max_grad_norm=1.0,
            epochs=1,
            **kwargs,
        )


def test_bf16_needs_float32_parameters():
    x, y = _data()
    model = create_model("smallcnn", CLASSES, SIZE, widths=(8, 16), gn_groups=4, seed=0).to(torch.bfloat16)
    with pytest.raises(UserError, match="keeps the trained parameters in float32"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(TensorDataset(x, y), batch_size=BATCH),
            scheme="clip-only",
            delta=1e-5,
            max_grad_norm=1.0,
            epochs=1,
            precision="bf16",
        )
