"""Noise for the local-DP mechanisms: uniform draws, from a seeded generator or from OS entropy, and
the inverse-CDF transforms that turn them into Laplace and Gaussian noise.

Noise is drawn as uniforms from a seeded generator (reproducible) or from OS entropy
(``secure=True``, for real releases) and turned into Laplace / Gaussian draws by the same
inverse-CDF transforms, so both paths are tested alike. Only numpy at the top; scipy.special is
imported where used.
"""

from __future__ import annotations

import math
import os

import numpy as np

from dpcam.errors import UserError


def bits_to_uniform(bits: np.ndarray) -> np.ndarray:
    """uint64 random words → float64 uniforms in the OPEN interval (0, 1), same shape.

    The top 53 bits with the lowest of them forced to 1 give an odd integer k < 2^53, and
    u = k·2^-53 is exact in float64: u lies on the 2^52 midpoints of a 2^-52 grid, never 0 or 1,
    and the distribution is exactly symmetric about 1/2 (so Laplace/Gaussian draws are symmetric).
    """
    k = (bits >> np.uint64(11)) | np.uint64(1)
    return k.astype(np.float64) * (2.0**-53)


def laplace_from_uniform(u: np.ndarray, scale: float | np.ndarray = 1.0) -> np.ndarray:
    """Inverse-CDF Laplace(0, scale): float64 uniforms u in (0, 1) → float32 draws, same shape.

    x = -sign(u - 1/2) · scale · log(1 - |2u - 1|); ``scale`` broadcasts against ``u``.
    ``1 - |2u - 1| = 2·min(u, 1 - u)`` is exact for the uniforms of :func:`bits_to_uniform`.
    """
    t = 1.0 - u
    np.minimum(u, t, out=t)
    t *= 2.0
    x = t.astype(np.float32)  # t ≥ 2^-52 is a normal float32; rounding moves log t by < 1e-7
    np.log(x, out=x)  # ≤ 0: the draw for u < 1/2
    np.negative(x, out=x, where=u >= 0.5)
    x *= np.asarray(scale, dtype=np.float32)
    return x


def gaussian_from_uniform(u: np.ndarray, sigma: float | np.ndarray = 1.0) -> np.ndarray:
    """Inverse-CDF Gaussian N(0, sigma²): float64 uniforms u in (0, 1) → float32 draws, same shape."""
    from scipy.special import ndtri

    z = ndtri(u)
    z = z.astype(np.float32)
    z *= np.asarray(sigma, dtype=np.float32)
    return z


class NoiseSource:
    """Uniform (0, 1) float64 draws, from a seeded generator or from OS entropy.

    ``NoiseSource(seed, stream=(...))``: numpy's PCG64 seeded by ``SeedSequence([seed, *stream])``,
    so the same seed and stream give the same draws; ``stream`` separates independent uses of
    one seed (e.g. one stream per mechanism and ε). ``NoiseSource(secure=True)`` reads
    ``os.urandom`` (not reproducible; for real releases). Draws are consumed in order, so splitting
    one request into several smaller ones yields the same numbers (batch size never changes the output).
    """

    def __init__(self, seed: int | None = 0, *, secure: bool = False, stream: tuple[int, ...] = ()):
        self.secure = bool(secure)
        if self.secure:
            self.seed = None
            self._gen = None
        else:
            if seed is None:
                raise ValueError("a seeded NoiseSource needs a seed (or pass secure=True)")
            if int(seed) < 0 or any(int(s) < 0 for s in stream):
                raise UserError(f"ldp.seed = {seed}: must be an integer ≥ 0")
            self.seed = int(seed)
            self._gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *map(int, stream)])))

    def bits(self, size: int) -> np.ndarray:
        """``size`` random uint64 words."""
        if self.secure:
            return np.frombuffer(os.urandom(8 * int(size)), dtype=np.uint64)
        return self._gen.bit_generator.random_raw(int(size))

    def uniform(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """float64 array of ``shape`` with uniforms in the open interval (0, 1)."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return bits_to_uniform(self.bits(math.prod(shape))).reshape(shape)

    def laplace(self, shape, scale: float | np.ndarray = 1.0) -> np.ndarray:
        """float32 Laplace(0, scale) draws of ``shape`` (``scale`` broadcasts)."""
        return laplace_from_uniform(self.uniform(shape), scale)

    def gaussian(self, shape, sigma: float | np.ndarray = 1.0) -> np.ndarray:
        """float32 N(0, sigma²) draws of ``shape`` (``sigma`` broadcasts)."""
        return gaussian_from_uniform(self.uniform(shape), sigma)
