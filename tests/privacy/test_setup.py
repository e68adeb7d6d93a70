"""PrivateSetup: the ledger's state, the plain module and its hooks, augmentation multiplicity."""

import io

import pytest
import torch
from torch import nn

from dpcam.errors import UserError
from dpcam.privacy.engine import make_private
from tests.privacy.private_helpers import DELTA, _parts, _setup, _train

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def test_ledger_round_trip_never_reset():
    setup = _setup("gaussian")
    _train(setup, 4)
    buf = io.BytesIO()
    torch.save(setup.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = _setup("gaussian")
    resumed.load_state_dict(state)
    assert resumed.steps_taken == 4
    assert resumed.epsilon() == setup.epsilon()
    _train(resumed, 1)
    assert resumed.epsilon() > setup.epsilon()
    with pytest.raises(UserError, match="refusing to overwrite"):
        resumed.load_state_dict(state)


def test_dp_checkpoint_without_ledger_refused():
    setup = _setup("gaussian")
    for bad in (None, {}, {"history": []}):
        with pytest.raises(UserError, match="no privacy ledger"):
            setup.load_state_dict(bad)
    with pytest.raises(UserError, match="ledger is 'laplace-pld'"):
        setup.load_state_dict({"history": [(1.0, 0.1, 2)], "mechanism": "laplace-pld"})


def test_plain_module_is_the_wrapped_model():
    model, opt, loader = _parts()
    setup = make_private(
        model,
        opt,
        loader,
        scheme="gaussian",
        target_epsilon=1.0,
        delta=DELTA,
        max_grad_norm=1.0,
        epochs=1,
        accountant="rdp",
    )
    assert setup.module is not model and setup.plain_module is model


def test_hooks_off_runs_plain_module_without_per_sample_capture():
    setup = _setup("clip-only")
    x = torch.randn(4, 5)
    with setup.hooks_off() as plain:
        assert plain is setup.plain_module
        plain(x).sum().backward()  # training mode, grad enabled: hooks would capture activations
        assert all(getattr(p, "grad_sample", None) is None for p in plain.parameters())
    assert setup.module.hooks_enabled
    plain.zero_grad()
    _train(setup, 1)  # training still works afterwards
    assert setup.steps_taken == 1


@pytest.mark.parametrize("scheme, norm", [("clip-only", 2), ("laplace", 1)])
def test_augmentation_multiplicity_clips_the_mean_of_each_examples_views(scheme, norm):
    """Each example contributes one clipped gradient: the mean of its k views' gradients, clipped to C."""
    setup = _setup(scheme, target=5.0)
    plain = setup.plain_module
    reference = nn.Linear(5, 2)
    reference.load_state_dict(plain.state_dict())
    k, b = 3, 4
    x, y = torch.randn(b * k, 5) * 4, torch.randint(0, 2, (b,))  # b examples × k views, view-major
    setup.optimizer.zero_grad()
    setup.criterion(setup.module(x), y.repeat_interleave(k)).backward()
    setup.average_views(k)
    assert all(p.grad_sample.shape[0] == b for p in plain.parameters())
    c = setup.optimizer.max_grad_norm
    want = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(b):  # by hand: the mean over the views, one example at a time, clipped
        reference.zero_grad()
        for j in range(k):
            nn.functional.cross_entropy(reference(x[i * k + j : i * k + j + 1]), y[i : i + 1]).backward()
        g = [p.grad / k for p in reference.parameters()]
        size = sum(float(t.abs().pow(norm).sum()) for t in g) ** (1 / norm)
        for acc, t in zip(want, g):
            acc += t * min(1.0, c / (size + 1e-6))
    setup.optimizer.step()  # the clipped sum it formed, before noise: summed_grad
    for got, w in zip([p.summed_grad for p in plain.parameters()], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
