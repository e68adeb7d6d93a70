"""Helpers of the local-DP tests: an ldp config section and a tiny prepared dataset to derive from."""

import numpy as np

from dpcam.config import LdpConfig
from dpcam.data import store


def cfg(**kw) -> LdpConfig:
    return LdpConfig.model_validate(kw)


def write_source(path, n=24, h=8, w=8, masks=True, name="tiny", seed=0):
    """A tiny prepared dataset: random images, labels 0..2, masks, a stratified split."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    splits = store.stratified_split(labels, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    with store.DatasetWriter(path, n, h, w, with_masks=masks) as wr:
        wr.images[:] = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        if masks:
            wr.masks[:] = rng.integers(0, 2, (n, h, w), dtype=np.uint8)
        wr.finish(labels, splits, {"dataset": name, "classes": ["g0", "g1", "g2"], "image_size": h})
    return path
