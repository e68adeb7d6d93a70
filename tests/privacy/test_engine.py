import math

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpcam.errors import UserError
from dpcam.privacy import accounting as A
from dpcam.privacy.engine import make_private
from dpcam.privacy.laplace import LaplaceDPOptimizer, LaplaceLedger
from tests.privacy.private_helpers import DELTA, _parts, _setup, _train

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def test_poisson_batches_vary_with_mean_qn():
    setup = _setup("clip-only", n=400, batch_size=20)
    assert setup.sample_rate == pytest.approx(0.05)
    sizes = [len(yb) for _ in range(10) for _, yb in setup.data_loader]
    assert len(sizes) == 10 * 20
    assert len(set(sizes)) > 5  # Poisson: sizes vary
    assert sum(sizes) / len(sizes) == pytest.approx(0.05 * 400, rel=0.1)


def test_none_and_ldp_return_objects_unchanged():
    model, opt, loader = _parts()
    for scheme in ("none", "ldp"):
        setup = make_private(model, opt, loader, scheme=scheme)
        assert setup.module is model and setup.optimizer is opt and setup.data_loader is loader
        assert setup.plain_module is model
        assert setup.epsilon() == math.inf
        assert setup.report()["epsilon"] is None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_gaussian_epsilon_follows_steps_taken(accountant):
    setup = _setup("gaussian", accountant=accountant)
    assert isinstance(setup.optimizer, DPOptimizer) and not isinstance(setup.optimizer, LaplaceDPOptimizer)
    q, sigma = setup.sample_rate, setup.noise_multiplier
    assert setup.epsilon() == 0.0
    # calibrated for the steps the loader will yield: ε(planned) ≤ target
    assert setup.steps_planned == 2 * 10
    assert 0.97 <= A.gaussian_epsilon(sigma, q, setup.steps_planned, DELTA, accountant) <= 1.0
    _train(setup, 3)
    assert setup.steps_taken == 3
    assert setup.epsilon() == pytest.approx(A.gaussian_epsilon(sigma, q, 3, DELTA, accountant), rel=1e-9)
    rep = setup.report()
    assert rep["accountant"] == accountant and rep["steps"] == 3 and rep["noise_multiplier"] == sigma
    assert rep["epsilon_rdp_check"] == pytest.approx(A.gaussian_epsilon_rdp_dp_accounting(sigma, q, 3, DELTA))


def test_gaussian_does_not_overshoot_when_opacus_rounds_batches():
    # 93 batches: Opacus's DPDataLoader yields int(1/(1/93)) = 92 batches and accounts q = 1/92;
    # calibrating at q = 1/93 (as make_private_with_epsilon does) would overshoot the target
    setup = _setup("gaussian", n=93, batch_size=1, epochs=3, target=1.0)
    assert len(setup.data_loader) == 92 and setup.sample_rate == 1 / 92
    assert setup.steps_planned == 3 * 92
    assert A.gaussian_epsilon(setup.noise_multiplier, 1 / 92, 3 * 92, DELTA, "rdp") <= 1.0


def test_clip_only_reports_infinite_epsilon():
    setup = _setup("clip-only")
    assert setup.noise_multiplier == 0.0 and isinstance(setup.optimizer, DPOptimizer)
    _train(setup, 2)
    assert setup.steps_taken == 2
    assert setup.epsilon() == math.inf
    assert setup.report()["epsilon"] is None and setup.report()["target_epsilon"] is None


def test_laplace_setup_uses_l1_optimizer_and_own_ledger():
    setup = _setup("laplace")
    assert isinstance(setup.optimizer, LaplaceDPOptimizer)
    assert isinstance(setup.ledger, LaplaceLedger)
    lam, q = setup.noise_multiplier, setup.sample_rate
    assert 0.97 <= A.laplace_epsilon(lam, q, setup.steps_planned, DELTA) <= 1.0
    _train(setup, 3)
    assert setup.ledger.history == [(lam, q, 3)]
    assert setup.epsilon() == A.laplace_epsilon(lam, q, 3, DELTA)
    rep = setup.report()
    assert rep["accountant"] == "pld" and rep["step_epsilon"] == pytest.approx(1 / lam)
    assert rep["epsilon"] <= rep["epsilon_composition_bound"]

    resumed = _setup("laplace")
    resumed.load_state_dict(setup.state_dict())
    assert resumed.epsilon() == setup.epsilon()


def test_non_poisson_loader_refused():
    from opacus.data_loader import DPDataLoader

    assert isinstance(_setup("clip-only").data_loader, DPDataLoader)
    with pytest.raises(UserError, match="Poisson"):
        _setup("gaussian", poisson_sampling=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "dp"}, "unknown privacy scheme"),
        ({"accountant": "moments"}, "unknown accountant"),
        ({"target_epsilon": 0.0}, "ε"),
        ({"target_epsilon": -1.0}, "ε"),
        ({"target_epsilon": None}, "ε"),
        ({"delta": 1.0}, "δ"),
        ({"delta": 0.0}, "δ"),
        ({"max_grad_norm": 0.0}, "clipping bound"),
        ({"epochs": 0}, "epochs"),
        ({"grad_sample_mode": "magic"}, "grad_sample_mode"),
        ({"scheme": "laplace", "grad_sample_mode": "ghost"}, "per-example"),
        ({"target_epsilon": 1e-9, "accountant": "rdp"}, "cannot be reached"),
    ],
)
def test_bad_inputs_are_user_errors(kwargs, match):
    model, opt, loader = _parts()
    args = dict(scheme="gaussian", target_epsilon=1.0, delta=DELTA, max_grad_norm=1.0, epochs=1, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        make_private(model, opt, loader, **args)


def test_incompatible_model_is_user_error():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    _, _, loader = _parts()
    with pytest.raises(UserError, match="not compatible with Opacus"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            scheme="clip-only",
            delta=DELTA,
            max_grad_norm=1.0,
            epochs=1,
        )


@pytest.mark.slow
def test_delta_not_below_one_over_n_is_refused_unless_forced_then_warned():
    model, opt, loader = _parts(n=200)
    args = dict(scheme="gaussian", target_epsilon=2.0, delta=1 / 100, max_grad_norm=1.0, epochs=1)
    with pytest.raises(UserError, match=r"^δ=0.01 ≥ 1/N = 0.005 for N=200 .* \(δ·N = 2\), or set train.force_delta"):
        make_private(model, opt, loader, **args)
    with pytest.warns(UserWarning, match="1/N"):
        make_private(model, opt, loader, **args, large_delta=True)
    make_private(*_parts(n=200), scheme="clip-only", delta=1 / 100, max_grad_norm=1.0, epochs=1)  # no guarantee


@pytest.mark.slow
def test_the_delta_warning_is_given_once(caplog, recwarn):
    """One warning (the CLI prints it as one line), not also a log record of the same text."""
    import logging
    import warnings

    model, opt, loader = _parts(n=200)
    warnings.simplefilter("always")
    with caplog.at_level(logging.DEBUG):
        make_private(
            model,
            opt,
            loader,
            scheme="gaussian",
            target_epsilon=2.0,
            delta=1 / 100,
            max_grad_norm=1.0,
            epochs=1,
            large_delta=True,
        )
    assert [str(w.message) for w in recwarn.list if "1/N" in str(w.message)] != []
    assert len([w for w in recwarn.list if "1/N" in str(w.message)]) == 1
    assert not [r for r in caplog.records if "1/N" in r.getMessage()]


# ------------------------------------------------------------------------------------ laplace-paper (no guarantee)


@pytest.mark.slow
def test_laplace_paper_noise_is_the_gaussian_runs_sigma_and_it_gives_no_epsilon():
    """The replica's σ is exactly a Gaussian run's at the same (ε, δ, accountant, plan); it reports no ε, no δ."""
    from dpcam.privacy.laplace import NoGuaranteeLedger, PaperLaplaceDPOptimizer

    gauss = _setup("gaussian", accountant="prv", target=2.0)
    with pytest.warns(UserWarning, match="laplace-paper has no privacy guarantee"):
        paper = _setup("laplace-paper", accountant="prv", target=2.0)
    assert paper.noise_multiplier == gauss.noise_multiplier and paper.sample_rate == gauss.sample_rate
    assert type(paper.optimizer) is PaperLaplaceDPOptimizer and isinstance(paper.ledger, NoGuaranteeLedger)
    _train(paper, 3)
    assert paper.steps_taken == 3 and paper.epsilon() is None
    with pytest.raises(UserError, match="no privacy guarantee"):
        paper.ledger.get_epsilon(DELTA)
    rep = paper.report()
    assert (rep["epsilon"], rep["target_epsilon"], rep["delta"], rep["accountant"]) == (None, None, None, None)
    assert rep["guarantee"] == "none" and rep["nominal_epsilon"] == 2.0 and rep["nominal_delta"] == DELTA
    assert rep["nominal_accountant"] == "prv" and rep["noise_scale"] == paper.noise_multiplier * 1.0
    assert "C·√d (d = 12 trained parameters)" in rep["guarantee_reason"]
    # the valid bound, independently: Laplace of scale σC against L1 sensitivity √12·C, i.e. multiplier σ/√12
    sigma, q = paper.noise_multiplier, paper.sample_rate
    assert rep["epsilon_l1_bound"] == pytest.approx(A.laplace_epsilon(sigma / math.sqrt(12), q, 3, DELTA), rel=1e-9)
    assert gauss.report()["guarantee"] == "dp"

    resumed = _setup("laplace-paper", accountant="prv", target=2.0)
    resumed.load_state_dict(paper.state_dict())
    assert resumed.steps_taken == 3
    with pytest.raises(UserError, match="ledger is 'laplace-paper-none'"):
        _setup("gaussian").load_state_dict(paper.state_dict())


def test_laplace_paper_needs_per_example_gradients():
    model, opt, loader = _parts()
    with pytest.raises(UserError, match="laplace-paper scheme needs per-example gradients"):
        make_private(
            model,
            opt,
            loader,
            scheme="laplace-paper",
            target_epsilon=1.0,
            delta=DELTA,
            max_grad_norm=1.0,
            epochs=1,
            grad_sample_mode="ghost",
        )


@pytest.mark.parametrize("scheme", ["gaussian", "laplace"])
def test_frozen_parameters_are_not_clipped_noised_or_changed(scheme):
    """Fine-tuning: only parameters with requires_grad are private; the frozen ones get no noise and never move."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randint(0, 2, (200,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    setup = make_private(
        model,
        opt,
        DataLoader(TensorDataset(x, y), batch_size=20),
        scheme=scheme,
        target_epsilon=1.0,
        delta=DELTA,
        max_grad_norm=1.0,
        epochs=1,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert setup.trained_parameters == 4 * 2 + 2
    _train(setup, 4)
    after = setup.plain_module.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert model[0].weight.grad is None
