import json
import math

import numpy as np
import pytest

from dpcam.data.analytic_gaussian import analytic_gaussian_epsilon
from dpcam.data.mechanisms import MECHANISMS, Mechanism
from dpcam.data.noise import NoiseSource
from dpcam.errors import UserError
from tests.data.ldp_helpers import cfg


def grey(n, h=6, w=6, value=128, channels=3):
    return np.full((n, h, w, channels), value, np.uint8)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_mechanism_contract(name):
    mech = MECHANISMS[name](0.5, delta=1e-5, b=3, m=1)
    images = np.random.default_rng(0).integers(0, 256, (10, 7, 8, 3), dtype=np.uint8)
    out = mech.apply(images, NoiseSource(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    assert np.array_equal(out, mech.apply(images, NoiseSource(1)))  # same seed, same output
    assert not np.array_equal(out, mech.apply(images, NoiseSource(2)))
    src = NoiseSource(1)  # the batch split does not change the output
    halves = np.concatenate([mech.apply(images[:4], src), mech.apply(images[4:], src)])
    assert np.array_equal(out, halves)
    assert np.array_equal(MECHANISMS[name].from_config(0.5, cfg(dp_pix={"b": 3})).apply(images, NoiseSource(1)), out)
    g = mech.guarantee((7, 8, 3))
    assert {"scope", "neighbours", "epsilon", "delta", "image_epsilon", "image_delta", "values", "words"} <= set(g)
    assert g["scope"] in ("per value", "per image", "none") and g["values"] == 7 * 8 * 3 and g["words"]
    json.dumps({"params": mech.params((7, 8, 3)), "guarantee": g}, allow_nan=False)  # strict JSON
    assert mech.name == name
    with pytest.raises(UserError, match="ε"):
        MECHANISMS[name](0.0)
    with pytest.raises(UserError, match="ε"):
        MECHANISMS[name](-1)


def test_register_mechanism_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        MECHANISMS.add(type("X", (Mechanism,), {"name": "pixel-laplace"}))


def test_singh_sikka_adds_one_offset_per_image():
    eps = 50.0  # scale 5.1: mid-grey images never clip
    images = grey(40, 5, 4)
    out = MECHANISMS["singh-sikka"](eps).apply(images, NoiseSource(5))
    diff = out.astype(np.int16) - images
    per_image = diff.reshape(40, -1)
    assert np.all(per_image == per_image[:, :1])  # constant across pixels and channels
    assert np.unique(per_image[:, 0]).size > 5  # but differs between images
    expected = np.rint(NoiseSource(5).laplace((40,), 255 / eps))  # one draw per image
    assert np.array_equal(per_image[:, 0], expected.astype(np.int16))


def test_singh_sikka_has_no_guarantee_in_plain_words():
    g = MECHANISMS["singh-sikka"](1.0).guarantee((64, 64, 3))
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
    mech = MECHANISMS[name](30.0, delta=1e-5)
    images = grey(8, 6, 5)
    out = mech.apply(images, NoiseSource(9))
    expected = np.clip(np.rint(128 + draw(mech, NoiseSource(9), images.shape)), 0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.unique(out.astype(np.int16) - 128).size > 5


def test_pixel_laplace_and_gaussian_guarantee_numbers():
    n = 64 * 64 * 3
    g = MECHANISMS["pixel-laplace"](0.5).guarantee((64, 64, 3))
    assert g["scope"] == "per value" and g["epsilon"] == 0.5 and g["image_epsilon"] == n * 0.5 == 6144
    assert "6144" in g["words"] and "12288" in g["words"]
    mech = MECHANISMS["pixel-gaussian"](1.0, delta=1e-5)
    assert mech.sigma == pytest.approx(255 * 3.7306, rel=1e-4)
    g = mech.guarantee((64, 64, 3))
    assert (
        g["epsilon"] == 1.0
        and g["delta"] == 1e-5
        and g["image_epsilon"] == pytest.approx(analytic_gaussian_epsilon(mech.sigma, 1e-5, 255 * math.sqrt(n)))
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
    exact = MECHANISMS["dp-pix"](1e12, b=b).apply(images, NoiseSource(0))  # noise ≈ 0
    for k in range(3):
        assert np.array_equal(exact[k], np.rint(_cell_means_by_loop(images[k].astype(np.float64), b)).astype(np.uint8))
    noisy = MECHANISMS["dp-pix"](1.0, b=b).apply(images, NoiseSource(0))
    for i in range(0, h, b):
        for j in range(0, w, b):
            cell = noisy[:, i : i + b, j : j + b].reshape(3, -1, 3)
            assert np.all(cell == cell[:, :1])


def test_dp_pix_noise_scale_per_cell_including_edge_cells():
    h, w, b, m, eps = 6, 7, 4, 2, 3.0
    mech = MECHANISMS["dp-pix"](eps, b=b, m=m)
    counts = mech.cell_counts(h, w)
    assert counts.tolist() == [[16, 12], [8, 6]]  # edge cells keep only the pixels they have
    images = grey(5, h, w)
    out = mech.apply(images, NoiseSource(4))
    scale = 3 * 255 * m / (counts * eps)  # C·255·m/(a·ε): every pixel costs ε/m
    assert np.allclose(scale * counts * eps / (3 * 255), m)
    noise = NoiseSource(4).laplace((5, 2, 2, 3), scale[None, :, :, None])
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
    mech = MECHANISMS["dp-pix"](eps, b=b)
    p = mech.params((8, 8, c))
    assert p["scale"] == pytest.approx(10.0) and p["channels"] == c and p["edge_cells"] == []
    assert f"C = {c} channel" in p["scale_formula"]
    out = mech.apply(grey(4000, 8, 8, channels=c), NoiseSource(2))
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
    out = MECHANISMS["dp-pix"](eps, b=4).apply(grey(4000, 8, 8), NoiseSource(2))
    resid = out[:, ::4, ::4].astype(np.float64) - 128
    assert abs(np.abs(resid).mean() / 10.0 - 1) < 0.02  # rounding shifts E|X| by < 0.1%


def test_dp_pix_guarantee_numbers():
    g = MECHANISMS["dp-pix"](0.5, b=4, m=2).guarantee((64, 48, 3))
    assert g["scope"] == "per image" and g["epsilon"] == 0.5 and g["delta"] == 0.0
    assert g["image_epsilon"] == 0.5 * 64 * 48 / 2 and "at most 2 pixel" in g["words"]


def test_mechanism_parameter_errors_are_user_errors():
    with pytest.raises(UserError, match="delta"):
        MECHANISMS["pixel-gaussian"](1.0, delta=0.0)
    with pytest.raises(UserError, match="b ="):
        MECHANISMS["dp-pix"](1.0, b=0)
