import os

from pathlib import Path

import numpy as np
import pytest

from dpcam.data import store

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so params.yaml, data/ and mlruns/ never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


def make_tiny(name="tiny", n=240, size=16, root=Path("data/prepared"), masks=False):
    """Two classes a small CNN separates in a few epochs: class 1 has a bright centre square (its mask)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    c = size // 4
    images[labels == 1, c : 3 * c, c : 3 * c] += 120
    splits = store.stratified_split(labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    with store.DatasetWriter(root / name, n, size, size, with_masks=masks) as w:
        w.images[:] = images
        if masks:
            w.masks[labels == 1, c : 3 * c, c : 3 * c] = 1
        w.finish(labels, splits, {"dataset": name, "classes": ["plain", "square"]})
    return root / name


