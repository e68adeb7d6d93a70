import json
import math

import numpy as np
import pytest
from PIL import Image

from dpcam.data import ldp, store
from dpcam.errors import UserError
from tests.data.ldp_helpers import cfg, write_source


def test_derive_keeps_labels_masks_splits_and_writes_the_manifest(tmp_path):
    src = write_source(tmp_path / "prep/tiny")
    out = ldp.derive(src, "pixel-laplace", 1, cfg(seed=3), out_root=tmp_path / "ldp", progress=False)
    assert out == tmp_path / "ldp/tiny/pixel-laplace-eps1"
    a, d = store.load_dataset(src), store.load_dataset(out)
    assert np.array_equal(a.labels, d.labels) and np.array_equal(a.masks, d.masks)
    assert all(np.array_equal(a.splits[k], d.splits[k]) for k in store.SPLITS)
    assert d.images.shape == a.images.shape and not np.array_equal(d.images, a.images)
    m = d.manifest
    assert m["dataset"] == "tiny" and m["kind"] == "ldp" and m["classes"] == ["g0", "g1", "g2"]
    assert m["image_size"] == 8 and m["seed"] == 3 and m["secure"] is False
    assert m["source"] == {"dataset_dir": str(src), "manifest_checksums": a.manifest["checksums"]}
    assert m["mechanism"] == {"name": "pixel-laplace", "epsilon": 1.0, "scale": 255.0, "sensitivity": 255.0}
    assert m["guarantee"]["image_epsilon"] == 8 * 8 * 3 * 1.0 and m["guarantee"]["scope"] == "per value"
    assert m["splits"] == a.manifest["splits"] and m["count"] == 24
    json.loads((out / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    png = Image.open(out / "samples.png")
    assert png.size[0] > 6 * 8 and png.size[1] > 2 * 8
    assert not list((tmp_path / "ldp/tiny").glob(".*")), "no temporary leftovers"


def test_derive_is_deterministic_and_batch_size_free(tmp_path, monkeypatch):
    src = write_source(tmp_path / "prep/tiny", masks=False)
    runs = []
    for root, batch in (("r1", ldp.BATCH_VALUES), ("r2", ldp.BATCH_VALUES), ("r3", 5 * 8 * 8 * 3)):
        monkeypatch.setattr(ldp, "BATCH_VALUES", batch)
        out = ldp.derive(src, "dp-pix", 0.5, cfg(seed=1, dp_pix={"b": 3}), out_root=tmp_path / root, progress=False)
        runs.append((out / "images.npy").read_bytes())
    assert runs[0] == runs[1] == runs[2]
    other = ldp.derive(src, "dp-pix", 0.5, cfg(seed=2, dp_pix={"b": 3}), out_root=tmp_path / "r4", progress=False)
    assert (other / "images.npy").read_bytes() != runs[0]
    assert store.load_dataset(other).masks is None


def test_derive_mechanisms_and_epsilons_get_independent_noise(tmp_path):
    src = write_source(tmp_path / "prep/tiny")
    a = ldp.derive(src, "singh-sikka", 0.5, cfg(), out_root=tmp_path / "ldp", progress=False)
    b = ldp.derive(src, "singh-sikka", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    offs = [store.load_dataset(p).images.astype(np.int16) - store.load_dataset(src).images for p in (a, b)]
    # a scale-2 copy of the same draws would make the ε=0.5 offsets twice the ε=1 ones wherever nothing clipped
    assert not np.array_equal(np.sign(offs[0]), np.sign(offs[1]))


def test_secure_derive_differs_between_runs_and_records_no_seed(tmp_path):
    src = write_source(tmp_path / "prep/tiny")
    outs = [
        ldp.derive(src, "pixel-gaussian", 1, cfg(secure=True, seed=5), out_root=tmp_path / r, progress=False)
        for r in ("a", "b")
    ]
    m = store.load_dataset(outs[0]).manifest
    assert m["secure"] is True and m["seed"] is None
    assert m["guarantee"]["delta"] == 1e-5 and m["mechanism"]["sigma"] > 255
    assert (outs[0] / "images.npy").read_bytes() != (outs[1] / "images.npy").read_bytes()


def test_derive_user_errors(tmp_path):
    src = write_source(tmp_path / "prep/tiny")
    with pytest.raises(UserError, match="known: singh-sikka, pixel-laplace, pixel-gaussian, dp-pix"):
        ldp.derive(src, "pixel-magic", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    with pytest.raises(UserError, match="dpcam prepare"):
        ldp.derive(tmp_path / "prep/missing", "dp-pix", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    for bad in (0, -0.5, math.inf, math.nan):
        with pytest.raises(UserError, match="> 0"):
            ldp.derive(src, "dp-pix", bad, cfg(), out_root=tmp_path / "ldp", progress=False)
    out = ldp.derive(src, "dp-pix", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    with pytest.raises(UserError, match="local-DP derivative"):
        ldp.derive(out, "dp-pix", 1, cfg(), out_root=tmp_path / "ldp2", progress=False)
    assert sorted(p.name for p in (tmp_path / "ldp/tiny").iterdir()) == ["dp-pix-eps1"]
