"""The cost of tuning's maths (dpcam.privacy.tuning): composition, the search space's worst case,
random-search bounds."""

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from dpcam.privacy import tuning as T
from dpcam.privacy.plan import loader_batches, poisson_plan


def test_composed_epsilon_matches_the_accountants():
    from dpcam.privacy.accounting import gaussian_epsilon, laplace_epsilon

    g = ("gaussian", 1.1, 0.05, 200)
    lap = ("laplace", 5.0, 0.05, 100)
    assert T.composed_epsilon([g], 1e-5) == pytest.approx(gaussian_epsilon(1.1, 0.05, 200, 1e-5, "prv"), rel=0.03)
    assert T.composed_epsilon([lap], 1e-5) == pytest.approx(laplace_epsilon(5.0, 0.05, 100, 1e-5), rel=0.03)
    both = T.composed_epsilon([g, lap], 1e-5)
    assert max(T.composed_epsilon([g], 1e-5), T.composed_epsilon([lap], 1e-5)) < both
    assert both <= T.composed_epsilon([g], 1e-5) + T.composed_epsilon([lap], 1e-5) + 1e-9


def test_random_search_bounds_behave():
    mech = [("gaussian", 1.5, 0.02, 500)]
    single = T._rdp_to_dp(T.rdp_curve(*mech[0], orders=np.array(T.RDP_ORDERS)), np.array(T.RDP_ORDERS), 1e-5)
    for dist in ("poisson", "geometric"):
        b = [T.random_search_bound(dist, mu, mech, 1e-5) for mu in (2, 10, 50)]
        assert single < b[0] < b[1] < b[2], (dist, single, b)  # more trials on average cost more
        assert b[2] < 50 * single  # and far less than composing 50 runs naively
    # a less private base algorithm costs more
    assert T.random_search_bound("poisson", 10, [("gaussian", 0.8, 0.02, 500)], 1e-5) > T.random_search_bound(
        "poisson", 10, mech, 1e-5
    )
    # the worst case over several mechanisms is at least each one's
    both = T.random_search_bound("geometric", 10, mech + [("laplace", 20.0, 0.02, 500)], 1e-5)
    assert both >= T.random_search_bound("geometric", 10, mech, 1e-5) - 1e-12


def test_worst_case_noise_is_below_every_trials():
    from dpcam.privacy.accounting import calibrate_laplace

    # the space: schemes [laplace], epsilon [1, 4], batch_size [50], epochs [2, 2]; train δ 1e-3, 500 images
    ((scheme, lam, q, steps),) = T.worst_case_mechanisms(["laplace"], [50], (2, 2), 4, 1e-3, "prv", 500)
    assert (q, steps) == (0.1, 20)
    for target in (4.0, 3.99, 3.9):
        assert lam <= calibrate_laplace(target, 1e-3, q, steps)


def test_worst_case_plan_is_the_poisson_plan_opacus_runs():
    """A loader length L with int(1/(1/L)) == L − 1: Opacus samples and accounts L − 1 steps per epoch at
    q = 1/(L − 1), not L steps at 1/L; the worst case is that plan."""
    n = 5000
    batch = next(b for b in range(n, 0, -1) if (L := loader_batches(n, b)) > 1 and int(1 / (1 / L)) == L - 1)
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    L = len(loader)
    dp = len(DPDataLoader.from_data_loader(loader))
    assert L == loader_batches(n, batch) and dp == L - 1
    mechanisms = T.worst_case_mechanisms(["gaussian", "laplace"], [batch], (1, 2), 8.0, 1e-5, "rdp", n)
    assert [(m[0], m[3]) for m in mechanisms] == [
        ("gaussian", dp),
        ("gaussian", 2 * dp),
        ("laplace", dp),
        ("laplace", 2 * dp),
    ]
    for (_scheme, noise, q, steps), epochs in zip(mechanisms, (1, 2, 1, 2)):
        plan_q, _, plan_steps = poisson_plan(L, epochs)
        assert (q, steps) == (plan_q, plan_steps)
        assert q == 1 / dp and steps == epochs * dp and q > 1 / L
        assert noise > 0
