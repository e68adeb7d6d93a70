import json
from pathlib import Path

import numpy as np

from dpcam.config import PrepareConfig
from dpcam.data import store, synthetic
from dpcam.data.synthetic_stage import prepare_synthetic, sample_grid, save_sample_grid

N, SIZE = 50, 32


def test_prepare_synthetic_writes_a_loadable_dataset():
    cfg = PrepareConfig(
        dataset="syn-test", size=SIZE, seed=3, workers=1, synthetic={"n": N, "balance": "aptos", "lesion_scale": 1.0}
    )
    out = prepare_synthetic(cfg)
    assert out == Path("data/prepared/syn-test")
    ds = store.load_dataset(out)
    images, labels, masks = synthetic.generate(N, SIZE, seed=3, balance="aptos", workers=1)
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    assert np.array_equal(ds.masks, masks)
    assert ds.classes == synthetic.CLASSES and ds.image_size == SIZE
    idx = np.concatenate([ds.splits[k] for k in store.SPLITS])
    assert np.array_equal(np.sort(idx), np.arange(N))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "syn-test" and m["kind"] == "prepared" and m["source"] == {"format": "synthetic"}
    assert m["image_size"] == SIZE and m["seed"] == 3
    assert m["split_fractions"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    gen = m["generator"]
    assert gen["n"] == N and gen["balance"] == "aptos" and gen["lesion_scale"] == 1.0 and gen["version"] == 1
    x, y, mask = ds.split("train", with_masks=True)[0]
    assert x.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)


def test_sample_grid_has_a_row_per_grade(tmp_path):
    images, labels, masks = synthetic.generate(10, 32, seed=0, workers=1)
    grid = sample_grid(images, labels, masks, per_grade=2)
    assert grid.mode == "RGB" and grid.height > 5 * 128 and grid.width > 4 * 128
    path = save_sample_grid(tmp_path / "g.png", size=32, per_grade=1)
    assert path.is_file() and path.stat().st_size > 1000
