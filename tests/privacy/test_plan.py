import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from dpcam.privacy.plan import loader_batches, poisson_plan, training_plan


def _loader(n: int, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size)


def test_poisson_plan_matches_opacus_loader():
    loader = _loader(93, 1)
    assert poisson_plan(len(loader), 3) == (1 / 92, 92, 276)


@pytest.mark.parametrize("n, batch", [(93, 1), (5000, 53), (8400, 512), (2000, 512), (40, 100)])
def test_training_plan_is_what_opacus_samples(n, batch):
    """The plan search and audit use equals the loader training builds, as Opacus rebuilds and accounts it."""
    loader = _loader(n, min(batch, n))
    assert loader_batches(n, batch) == len(loader)
    dp = DPDataLoader.from_data_loader(loader)
    q, steps = training_plan(n, batch, 2)
    assert q == pytest.approx(1 / len(dp)) and steps == 2 * len(dp)
