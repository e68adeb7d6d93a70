import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from torch import nn

from dpcam.errors import UserError
from dpcam.privacy.accounting import laplace_epsilon
from dpcam.privacy.laplace import LaplaceDPOptimizer, LaplaceLedger, generate_laplace_noise


def _setup(model, *, lam, clip, ebs, seed=None):
    gsm = GradSampleModule(model)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    opt = LaplaceDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=lam,
        max_grad_norm=clip,
        expected_batch_size=ebs,
        generator=gen,
    )
    return gsm, opt


def _zero_grad_step(lam, clip, ebs, seed):
    """One step of a 50→20 linear model whose per-sample gradients are all zero: p.grad is pure noise/ebs."""
    torch.manual_seed(0)
    gsm, opt = _setup(nn.Linear(50, 20), lam=lam, clip=clip, ebs=ebs, seed=seed)
    out = gsm(torch.randn(ebs, 50))
    (out * 0).sum().backward()
    opt.step()
    return torch.cat([p.grad.flatten() for p in gsm.parameters()])


def test_noise_scale_is_lambda_times_c_with_zero_gradients():
    lam, clip, ebs = 1.7, 0.5, 8
    noise = _zero_grad_step(lam, clip, ebs, seed=3) * ebs  # undo the expected-batch-size normalisation
    scale = lam * clip
    assert noise.abs().mean().item() == pytest.approx(scale, rel=0.15)  # E|Laplace(b)| = b
    # Laplace, not Gaussian: the median of |X| is b·ln 2 (a Gaussian with E|X| = b has median 0.845·b)
    assert noise.abs().median().item() == pytest.approx(scale * math.log(2), rel=0.1)


def test_seeded_generator_is_reproducible():
    a = _zero_grad_step(1.0, 1.0, 4, seed=11)
    b = _zero_grad_step(1.0, 1.0, 4, seed=11)
    c = _zero_grad_step(1.0, 1.0, 4, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_laplace_noise_shape_dtype_and_zero_scale():
    ref = torch.zeros(3, 4, dtype=torch.float64)
    x = generate_laplace_noise(2.0, ref, torch.Generator().manual_seed(0))
    assert x.shape == ref.shape and x.dtype == torch.float64
    assert torch.equal(generate_laplace_noise(0.0, ref), ref)


def _clipped_sum(inputs, clip):
    """Σ_i clip_L1(g_i, C) of a bias-free 3→2 linear model, per-sample loss = Σ outputs (g_i = [x_i; x_i]), no noise.

    Opacus's default loss_reduction "mean": the batch loss is the mean of per-sample losses, and
    expected_batch_size=1 leaves the clipped sum undivided.
    """
    model = nn.Linear(3, 2, bias=False)
    gsm, opt = _setup(model, lam=0.0, clip=clip, ebs=1)
    gsm(inputs).sum(dim=1).mean().backward()
    opt.step()
    return model.weight.grad.clone()


def test_l1_clipping_per_sample():
    clip = 1.0
    inputs = torch.tensor([[3.0, -1.0, 0.0], [0.1, 0.1, -0.1], [0.0, 0.0, 5.0], [0.25, 0.0, 0.0]])
    l1 = 2 * inputs.abs().sum(dim=1)  # per-sample gradient L1 norm (two identical rows)
    for x, norm in zip(inputs, l1):
        g = _clipped_sum(x[None], clip)
        assert g.abs().sum().item() == pytest.approx(min(norm.item(), clip), rel=1e-5)
        assert g.abs().sum().item() <= clip + 1e-5
    # a batch sums the individually clipped gradients (hand-computed factors min(1, C/‖g_i‖₁))
    factors = (clip / l1).clamp(max=1.0)
    expected = (factors[:, None] * inputs).sum(dim=0).expand(2, 3)
    assert torch.allclose(_clipped_sum(inputs, clip), expected, atol=1e-5)


def test_clipping_is_l1_not_l2():
    # g = [x; x] with x = (1, 1, 1): L2 norm √6 ≈ 2.45, L1 norm 6; C = 3 clips under L1 only
    g = _clipped_sum(torch.ones(1, 3), 3.0)
    assert g.abs().sum().item() == pytest.approx(3.0, rel=1e-5)


def test_empty_batch_gives_noise_only():
    gsm, opt = _setup(nn.Linear(4, 2), lam=1.0, clip=1.0, ebs=4, seed=0)
    gsm(torch.zeros(0, 4)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in gsm.parameters())


def test_ledger_counts_steps_and_gives_pld_epsilon():
    ledger = LaplaceLedger()
    assert ledger.get_epsilon(1e-5) == 0.0
    for _ in range(5):
        ledger.step(noise_multiplier=2.0, sample_rate=0.1)
    ledger.step(noise_multiplier=2.0, sample_rate=0.2)  # e.g. two accumulated batches
    assert ledger.history == [(2.0, 0.1, 5), (2.0, 0.2, 1)]
    assert ledger.steps == 6
    assert ledger.get_epsilon(1e-5) > laplace_epsilon(2.0, 0.1, 5, 1e-5)


def test_ledger_state_round_trip_and_never_reset():
    ledger = LaplaceLedger()
    for _ in range(7):
        ledger.step(noise_multiplier=1.5, sample_rate=0.05)
    state = ledger.state_dict()
    fresh = LaplaceLedger()
    fresh.load_state_dict(state)
    assert fresh.history == [(1.5, 0.05, 7)]
    assert fresh.get_epsilon(1e-5) == ledger.get_epsilon(1e-5) == laplace_epsilon(1.5, 0.05, 7, 1e-5)
    with pytest.raises(UserError, match="refusing to overwrite"):
        ledger.load_state_dict({"history": [], "mechanism": "laplace-pld"})
    with pytest.raises(UserError, match="invalid"):
        LaplaceLedger().load_state_dict({"history": [(1.0, 0.1, 3)], "mechanism": "prv"})


def test_ledger_is_registered_with_opacus():
    assert isinstance(create_accountant("laplace-pld"), LaplaceLedger)


# ------------------------------------------------------------------------------------ laplace-paper's optimizer


def _paper_zero_grad_noise(sigma, clip, ebs, seed, shape=(50, 20)):
    from dpcam.privacy.laplace import PaperLaplaceDPOptimizer

    torch.manual_seed(0)
    gsm = GradSampleModule(nn.Linear(*shape))
    opt = PaperLaplaceDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=ebs,
        generator=torch.Generator().manual_seed(seed),
    )
    (gsm(torch.randn(ebs, shape[0])) * 0).sum().backward()
    opt.step()
    return torch.cat([p.grad.flatten() for p in gsm.parameters()]) * ebs  # undo the expected-batch-size division


def test_paper_noise_is_laplace_with_scale_sigma_c_not_gaussian_with_std_sigma_c():
    """Zero gradients, so the step is pure noise: a Laplace(0, σC) sample (KS test, scipy's own distribution),
    not N(0, (σC)²), and its standard deviation is √2·σC (the same scale parameter, not the same std)."""
    from scipy import stats

    sigma, clip = 1.3, 0.7
    noise = _paper_zero_grad_noise(sigma, clip, 8, seed=5, shape=(200, 50)).double().numpy()
    b = sigma * clip
    assert noise.size == 200 * 50 + 50
    assert stats.kstest(noise, "laplace", args=(0, b)).pvalue > 0.01
    assert stats.kstest(noise, "norm", args=(0, b)).pvalue < 1e-6  # Opacus's own draw
    assert stats.kstest(noise, "norm", args=(0, math.sqrt(2) * b)).pvalue < 1e-6  # not a Gaussian of its std either
    assert noise.std() == pytest.approx(math.sqrt(2) * b, rel=0.05)


def test_paper_clipping_is_opacus_flat_l2():
    from dpcam.privacy.laplace import PaperLaplaceDPOptimizer

    model = nn.Linear(3, 2, bias=False)
    gsm = GradSampleModule(model)
    opt = PaperLaplaceDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=3.0, expected_batch_size=1
    )
    gsm(torch.ones(1, 3)).sum(dim=1).mean().backward()  # g = [x; x], L2 norm √6 < 3 < L1 norm 6: unclipped in L2
    opt.step()
    assert model.weight.grad.abs().sum().item() == pytest.approx(6.0, rel=1e-5)


def test_no_guarantee_ledger_counts_steps_and_refuses_an_epsilon():
    from dpcam.privacy.laplace import NoGuaranteeLedger

    ledger = create_accountant("laplace-paper-none")
    assert isinstance(ledger, NoGuaranteeLedger) and ledger.mechanism() == "laplace-paper-none"
    for _ in range(3):
        ledger.step(noise_multiplier=0.9, sample_rate=0.1)
    assert ledger.history == [(0.9, 0.1, 3)]
    with pytest.raises(UserError, match="no privacy guarantee.*C·√d"):
        ledger.get_epsilon(1e-5)
