"""Streamed means: exact whatever the batching, order, merge or resume."""

import math

import torch

from dpcam.explain.streaming import RunningMean


def test_running_means_are_exact_whatever_the_batching_and_order():
    """The mean of the same per-image values has the same bits for any batch size, order, merge or resume
    (float64 running sums were not: 0.1 + 0.2 + 0.3 depends on the grouping)."""
    g = torch.Generator().manual_seed(0)
    v = torch.cat(
        [torch.rand(997, generator=g) * 10.0 ** torch.randint(-12, 8, (997,), generator=g), torch.tensor([1e16, -1e16])]
    )
    exact = math.fsum(v.double().tolist()) / v.numel()
    results = set()
    for bs in (1, 7, 64, 1000):
        for order in (torch.arange(v.numel()), torch.randperm(v.numel(), generator=g)):
            run = RunningMean()
            for k in range(0, v.numel(), bs):
                run.add({"m": v[order[k : k + bs]]})
            results.add(run.result()["m"])
    half = RunningMean().add({"m": v[:500]})
    resumed = RunningMean()
    resumed.load_state_dict(half.state_dict())
    resumed.merge(RunningMean().add({"m": v[500:]}))
    results.add(resumed.result()["m"])
    assert results == {exact}
