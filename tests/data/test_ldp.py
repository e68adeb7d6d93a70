import json
import math

import numpy as np
import pytest
from PIL import Image

from dpcam.config import LdpConfig
from dpcam.data import ldp, store
from dpcam.errors import UserError

N_DRAWS = 10**6


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


def grey(n, h=6, w=6, value=128, channels=3):
    return np.full((n, h, w, channels), value, np.uint8)


SOURCES = {
    "seeded": lambda: ldp.NoiseSource(7),
    "secure": lambda: ldp.NoiseSource(secure=True),
}


# ---- noise ------------------------------------------------------------------------------


def test_uniform_bits_map_into_the_open_interval_symmetrically():
    bits = np.array([0, 1 << 11, 2**64 - 1, (2**63) - 1, 2**63], dtype=np.uint64)
    u = ldp.bits_to_uniform(bits)
    assert u.dtype == np.float64
    assert u[0] == 2.0**-53 and u[2] == 1 - 2.0**-53  # never 0 or 1
    assert u[3] + u[4] == 1.0  # mirror words give mirror uniforms
    # the extreme uniforms give finite, mirror-image noise
    lap = ldp.laplace_from_uniform(u[[0, 2]], 1.0)
    gau = ldp.gaussian_from_uniform(u[[0, 2]], 1.0)
    assert np.all(np.isfinite(lap)) and lap[0] == -lap[1] < 0
    assert np.all(np.isfinite(gau)) and gau[0] == -gau[1] < 0


@pytest.mark.parametrize("source", SOURCES)
def test_uniforms_are_open_unit_interval_float64(source):
    u = SOURCES[source]().uniform((1000, 3))
    assert u.shape == (1000, 3) and u.dtype == np.float64
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05


@pytest.mark.parametrize("source", SOURCES)
def test_laplace_scale_fits_within_2_percent(source):
    scale = 3.0
    x = SOURCES[source]().laplace(N_DRAWS, scale).astype(np.float64)
    assert x.dtype == np.float64 and x.shape == (N_DRAWS,)
    assert abs(np.abs(x).mean() / scale - 1) < 0.02  # E|X| = b
    assert abs(x.std() / (math.sqrt(2) * scale) - 1) < 0.02
    assert abs(x.mean()) < 0.02 * scale
    assert abs(np.median(x)) < 0.02 * scale


@pytest.mark.parametrize("source", SOURCES)
def test_gaussian_sigma_fits_within_2_percent(source):
    sigma = 5.0
    x = SOURCES[source]().gaussian(N_DRAWS, sigma).astype(np.float64)
    assert abs(x.std() / sigma - 1) < 0.02
    assert abs(np.abs(x).mean() / (sigma * math.sqrt(2 / math.pi)) - 1) < 0.02
    assert abs(x.mean()) < 0.02 * sigma


def test_seeded_noise_is_reproducible_by_stream_and_chunking_does_not_matter():
    a = ldp.NoiseSource(3, stream=(1, 2)).uniform(1000)
    assert np.array_equal(a, ldp.NoiseSource(3, stream=(1, 2)).uniform(1000))
    src = ldp.NoiseSource(3, stream=(1, 2))
    assert np.array_equal(a, np.concatenate([src.uniform(300), src.uniform((7, 100))[:].ravel()]))
    assert not np.array_equal(a, ldp.NoiseSource(3, stream=(1, 3)).uniform(1000))
    assert not np.array_equal(a, ldp.NoiseSource(4, stream=(1, 2)).uniform(1000))


def test_secure_noise_differs_between_sources_and_has_no_seed():
    a, b = ldp.NoiseSource(secure=True), ldp.NoiseSource(secure=True)
    assert a.seed is None and a.secure
    assert not np.array_equal(a.uniform(64), b.uniform(64))


def test_negative_seed_is_a_user_error():
    with pytest.raises(UserError, match="ldp.seed"):
        ldp.NoiseSource(-1)


# ---- analytic Gaussian -----------------------------------------------------------------


def test_analytic_gaussian_known_value_and_tighter_than_classic():
    sigma = ldp.analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    assert sigma < math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0  # classic ≈ 4.84
    assert ldp.analytic_gaussian_sigma(1.0, 1e-5, 255.0) == pytest.approx(255 * sigma, rel=1e-9)


@pytest.mark.parametrize("eps,delta", [(0.25, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (10.0, 1e-3)])
def test_analytic_gaussian_hits_delta_and_matches_dp_accounting(eps, delta):
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import pld_privacy_accountant

    sigma = ldp.analytic_gaussian_sigma(eps, delta, 1.0)
    assert math.exp(ldp.gaussian_log_delta(eps, sigma, 1.0)) == pytest.approx(delta, rel=1e-6)
    assert ldp.gaussian_log_delta(eps, sigma * 0.99, 1.0) > math.log(delta)  # smallest σ: less noise fails
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(GaussianDpEvent(noise_multiplier=sigma))
    assert acc.get_epsilon(delta) == pytest.approx(eps, rel=2e-3, abs=1e-3)
    assert ldp.analytic_gaussian_epsilon(sigma, delta, 1.0) == pytest.approx(eps, rel=1e-9)


def test_image_level_gaussian_epsilon_matches_pld_and_survives_huge_epsilon():
    from dp_accounting.pld import privacy_loss_distribution

    mech = ldp.MECHANISMS["pixel-gaussian"](1.0, delta=1e-5)
    g = mech.guarantee((8, 8, 3))
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        mech.sigma, sensitivity=255 * math.sqrt(192), value_discretization_interval=1e-3
    )
    assert g["image_epsilon"] == pytest.approx(pld.get_epsilon_for_delta(1e-5), rel=1e-3)
    assert g["image_epsilon"] > 1.0 and g["image_delta"] == 1e-5
    # 224 px: ε in the thousands, e^ε would overflow without log space
    big = mech.guarantee((224, 224, 3))["image_epsilon"]
    assert big is not None and 5000 < big < 7000
    assert ldp.analytic_gaussian_epsilon(255.0 * 1e-4, 1e-5, 255.0) > 1e7  # tiny σ: huge but finite


# ---- mechanisms --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ldp.MECHANISMS))
def test_mechanism_contract(name):
    mech = ldp.MECHANISMS[name](0.5, delta=1e-5, b=3, m=1)
    images = np.random.default_rng(0).integers(0, 256, (10, 7, 8, 3), dtype=np.uint8)
    out = mech.apply(images, ldp.NoiseSource(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    assert np.array_equal(out, mech.apply(images, ldp.NoiseSource(1)))  # same seed, same output
    assert not np.array_equal(out, mech.apply(images, ldp.NoiseSource(2)))
    src = ldp.NoiseSource(1)  # the batch split does not change the output
    halves = np.concatenate([mech.apply(images[:4], src), mech.apply(images[4:], src)])
    assert np.array_equal(out, halves)
    assert np.array_equal(
        ldp.MECHANISMS[name].from_config(0.5, cfg(dp_pix={"b": 3})).apply(images, ldp.NoiseSource(1)), out
    )
    g = mech.guarantee((7, 8, 3))
    assert {"scope", "neighbours", "epsilon", "delta", "image_epsilon", "image_delta", "values", "words"} <= set(g)
    assert g["scope"] in ("per value", "per image", "none") and g["values"] == 7 * 8 * 3 and g["words"]
    json.dumps({"params": mech.params((7, 8, 3)), "guarantee": g}, allow_nan=False)  # strict JSON
    assert mech.name == name
    with pytest.raises(UserError, match="ε"):
        ldp.MECHANISMS[name](0.0)
    with pytest.raises(UserError, match="ε"):
        ldp.MECHANISMS[name](-1)


def test_register_mechanism_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        ldp.MECHANISMS.add(type("X", (ldp.Mechanism,), {"name": "pixel-laplace"}))


def test_singh_sikka_adds_one_offset_per_image():
    eps = 50.0  # scale 5.1: mid-grey images never clip
    images = grey(40, 5, 4)
    out = ldp.MECHANISMS["singh-sikka"](eps).apply(images, ldp.NoiseSource(5))
    diff = out.astype(np.int16) - images
    per_image = diff.reshape(40, -1)
    assert np.all(per_image == per_image[:, :1])  # constant across pixels and channels
    assert np.unique(per_image[:, 0]).size > 5  # but differs between images
    expected = np.rint(ldp.NoiseSource(5).laplace((40,), 255 / eps))  # one draw per image
    assert np.array_equal(per_image[:, 0], expected.astype(np.int16))


def test_singh_sikka_has_no_guarantee_in_plain_words():
    g = ldp.MECHANISMS["singh-sikka"](1.0).guarantee((64, 64, 3))
    assert g["scope"] == "none" and g["image_epsilon"] is None and g["epsilon"] is None
    assert "no image-level guarantee" in g["words"] and "brightness" in g["words"]


@pytest.mark.parametrize(
    "name,draw",
    [
        ("pixel-laplace", lambda m, src, shape: src.laplace(shape, 255 / m.epsilon)),
        ("pixel-gaussian", lambda m, src, shape: src.gaussian(shape, m.sigma)),
    ],
)
def test_per_value_mechanisms_add_independent_noise_to_every_value(name, draw):
    mech = ldp.MECHANISMS[name](30.0, delta=1e-5)
    images = grey(8, 6, 5)
    out = mech.apply(images, ldp.NoiseSource(9))
    expected = np.clip(np.rint(128 + draw(mech, ldp.NoiseSource(9), images.shape)), 0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.unique(out.astype(np.int16) - 128).size > 5


def test_pixel_laplace_and_gaussian_guarantee_numbers():
    n = 64 * 64 * 3
    g = ldp.MECHANISMS["pixel-laplace"](0.5).guarantee((64, 64, 3))
    assert g["scope"] == "per value" and g["epsilon"] == 0.5 and g["image_epsilon"] == n * 0.5 == 6144
    assert "6144" in g["words"] and "12288" in g["words"]
    mech = ldp.MECHANISMS["pixel-gaussian"](1.0, delta=1e-5)
    assert mech.sigma == pytest.approx(255 * 3.7306, rel=1e-4)
    g = mech.guarantee((64, 64, 3))
    assert (
        g["epsilon"] == 1.0
        and g["delta"] == 1e-5
        and g["image_epsilon"] == pytest.approx(ldp.analytic_gaussian_epsilon(mech.sigma, 1e-5, 255 * math.sqrt(n)))
    )


def _cell_means_by_loop(img, b):
    h, w, _ = img.shape
    out = np.empty(img.shape, np.float64)
    for i in range(0, h, b):
        for j in range(0, w, b):
            out[i : i + b, j : j + b] = img[i : i + b, j : j + b].reshape(-1, 3).mean(axis=0)
    return out


@pytest.mark.parametrize("h,w,b", [(8, 8, 4), (10, 7, 4), (5, 5, 2), (3, 4, 8), (5, 6, 10**6), (4, 4, 1)])
def test_dp_pix_is_constant_on_cells_and_uses_true_cell_means(h, w, b):
    images = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    exact = ldp.MECHANISMS["dp-pix"](1e12, b=b).apply(images, ldp.NoiseSource(0))  # noise ≈ 0
    for k in range(3):
        assert np.array_equal(exact[k], np.rint(_cell_means_by_loop(images[k].astype(np.float64), b)).astype(np.uint8))
    noisy = ldp.MECHANISMS["dp-pix"](1.0, b=b).apply(images, ldp.NoiseSource(0))
    for i in range(0, h, b):
        for j in range(0, w, b):
            cell = noisy[:, i : i + b, j : j + b].reshape(3, -1, 3)
            assert np.all(cell == cell[:, :1])


def test_dp_pix_noise_scale_per_cell_including_edge_cells():
    h, w, b, m, eps = 6, 7, 4, 2, 3.0
    mech = ldp.MECHANISMS["dp-pix"](eps, b=b, m=m)
    counts = mech.cell_counts(h, w)
    assert counts.tolist() == [[16, 12], [8, 6]]  # edge cells keep only the pixels they have
    images = grey(5, h, w)
    out = mech.apply(images, ldp.NoiseSource(4))
    scale = 3 * 255 * m / (counts * eps)  # C·255·m/(a·ε): every pixel costs ε/m
    assert np.allclose(scale * counts * eps / (3 * 255), m)
    noise = ldp.NoiseSource(4).laplace((5, 2, 2, 3), scale[None, :, :, None])
    cells = np.clip(np.rint(128 + noise), 0, 255).astype(np.uint8)
    assert np.array_equal(out[:, ::b, ::b], cells)
    p = mech.params((h, w, 3))
    assert p["scale"] == 3 * 255 * m / (b * b * eps) and p["channels"] == 3 and p["cell_pixels"] == 16
    assert p["edge_cells"] == [
        {"pixels": a, "cells": 1, "scale": pytest.approx(3 * 255 * m / (a * eps))} for a in (6, 8, 12)
    ]


@pytest.mark.parametrize("c", [1, 4])
def test_dp_pix_reports_the_noise_scale_of_the_images_channel_count(c):
    """The recorded scale, the manifest's parameters and the words follow the image's C (not 3), as the noise
    drawn does, and name the edge cells."""
    eps, b = c * 255 / (16 * 10.0), 4  # full 4×4 cells get scale C·255/(16ε) = 10: mid-grey never clips in practice
    mech = ldp.MECHANISMS["dp-pix"](eps, b=b)
    p = mech.params((8, 8, c))
    assert p["scale"] == pytest.approx(10.0) and p["channels"] == c and p["edge_cells"] == []
    assert f"C = {c} channel" in p["scale_formula"]
    out = mech.apply(grey(4000, 8, 8, channels=c), ldp.NoiseSource(2))
    resid = out[:, ::4, ::4].astype(np.float64) - 128
    assert abs(np.abs(resid).mean() / p["scale"] - 1) < 0.02  # the noise actually drawn has the recorded scale
    g = mech.guarantee((8, 8, c))
    assert f"8×8×{c}" in g["words"] and f"{p['scale']:.4g}" in g["words"] and "edge cells" not in g["words"]
    g = mech.guarantee((10, 9, c))  # edge cells: rows of 2 pixels, a column of 1
    edges = mech.params((10, 9, c))["edge_cells"]
    assert [(e["pixels"], e["cells"]) for e in edges] == [(2, 1), (4, 2), (8, 2)]
    assert "edge cells" in g["words"] and f"{edges[0]['scale']:.4g}" in g["words"]
    assert g["values"] == 10 * 9 * c


def test_dp_pix_empirical_noise_scale():
    eps = 3 * 255 / (16 * 10.0)  # full 4×4 cells get scale 10: mid-grey never clips in practice
    out = ldp.MECHANISMS["dp-pix"](eps, b=4).apply(grey(4000, 8, 8), ldp.NoiseSource(2))
    resid = out[:, ::4, ::4].astype(np.float64) - 128
    assert abs(np.abs(resid).mean() / 10.0 - 1) < 0.02  # rounding shifts E|X| by < 0.1%


def test_dp_pix_guarantee_numbers():
    g = ldp.MECHANISMS["dp-pix"](0.5, b=4, m=2).guarantee((64, 48, 3))
    assert g["scope"] == "per image" and g["epsilon"] == 0.5 and g["delta"] == 0.0
    assert g["image_epsilon"] == 0.5 * 64 * 48 / 2 and "at most 2 pixel" in g["words"]


def test_mechanism_parameter_errors_are_user_errors():
    with pytest.raises(UserError, match="delta"):
        ldp.MECHANISMS["pixel-gaussian"](1.0, delta=0.0)
    with pytest.raises(UserError, match="b ="):
        ldp.MECHANISMS["dp-pix"](1.0, b=0)


# ---- derive -----------------------------------------------------------------------------


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


# ---- figure ------------------------------------------------------------------------------


def test_figure_ldp_grid(tmp_path):
    src = write_source(tmp_path / "prepared/tiny", n=30, h=12, w=12)
    for mech in ("singh-sikka", "dp-pix"):
        for eps in (1, 0.25, 0.5):
            ldp.derive(src, mech, eps, cfg(), out_root=tmp_path / "ldp", progress=False)
    out = ldp.figure_ldp("tiny", tmp_path / "fig/ldp.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
    img = Image.open(out)
    assert img.size[0] > 300 and img.size[1] > img.size[0]  # 8 rows × 4 columns
    assert not [p for p in (tmp_path / "fig").iterdir() if p.name != "ldp.png"]


def test_figure_ldp_errors(tmp_path):
    with pytest.raises(UserError, match="dpcam ldp"):
        ldp.figure_ldp("tiny", tmp_path / "f.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
    src = write_source(tmp_path / "prepared/tiny")
    ldp.derive(src, "dp-pix", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    write_source(tmp_path / "prepared/tiny", seed=9)  # re-prepared: the derivative is stale
    with pytest.raises(UserError, match="rerun `dpcam ldp"):
        ldp.figure_ldp("tiny", tmp_path / "f.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
