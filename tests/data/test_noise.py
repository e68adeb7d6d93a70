import math

import numpy as np
import pytest

from dpcam.data.noise import NoiseSource, bits_to_uniform, gaussian_from_uniform, laplace_from_uniform
from dpcam.errors import UserError

N_DRAWS = 10**6

SOURCES = {
    "seeded": lambda: NoiseSource(7),
    "secure": lambda: NoiseSource(secure=True),
}


def test_uniform_bits_map_into_the_open_interval_symmetrically():
    bits = np.array([0, 1 << 11, 2**64 - 1, (2**63) - 1, 2**63], dtype=np.uint64)
    u = bits_to_uniform(bits)
    assert u.dtype == np.float64
    assert u[0] == 2.0**-53 and u[2] == 1 - 2.0**-53  # never 0 or 1
    assert u[3] + u[4] == 1.0  # mirror words give mirror uniforms
    # the extreme uniforms give finite, mirror-image noise
    lap = laplace_from_uniform(u[[0, 2]], 1.0)
    gau = gaussian_from_uniform(u[[0, 2]], 1.0)
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
    a = NoiseSource(3, stream=(1, 2)).uniform(1000)
    assert np.array_equal(a, NoiseSource(3, stream=(1, 2)).uniform(1000))
    src = NoiseSource(3, stream=(1, 2))
    assert np.array_equal(a, np.concatenate([src.uniform(300), src.uniform((7, 100))[:].ravel()]))
    assert not np.array_equal(a, NoiseSource(3, stream=(1, 3)).uniform(1000))
    assert not np.array_equal(a, NoiseSource(4, stream=(1, 2)).uniform(1000))


def test_secure_noise_differs_between_sources_and_has_no_seed():
    a, b = NoiseSource(secure=True), NoiseSource(secure=True)
    assert a.seed is None and a.secure
    assert not np.array_equal(a.uniform(64), b.uniform(64))


def test_negative_seed_is_a_user_error():
    with pytest.raises(UserError, match="ldp.seed"):
        NoiseSource(-1)
