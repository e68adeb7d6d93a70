"""Helpers of the make_private and PrivateSetup tests: a tiny linear model and loader, its setup, a few steps."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpcam.privacy.engine import make_private

DELTA = 1e-3


def _parts(n=200, batch_size=20, seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(n, 5), torch.randint(0, 2, (n,))
    model = nn.Linear(5, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _setup(scheme, *, n=200, batch_size=20, epochs=2, accountant="rdp", target=1.0, **kw):
    model, opt, loader = _parts(n, batch_size)
    return make_private(
        model,
        opt,
        loader,
        scheme=scheme,
        target_epsilon=target,
        delta=DELTA,
        max_grad_norm=1.0,
        epochs=epochs,
        accountant=accountant,
        noise_generator=torch.Generator().manual_seed(0),
        **kw,
    )


def _train(setup, steps):
    done = 0
    while done < steps:
        for xb, yb in setup.data_loader:
            setup.optimizer.zero_grad()
            setup.criterion(setup.module(xb), yb).backward()
            setup.optimizer.step()
            done += 1
            if done == steps:
                return
