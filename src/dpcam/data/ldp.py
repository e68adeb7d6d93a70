"""Local-DP image mechanisms (a registry by name), their guarantees, and `dpcam ldp` derivatives.

Every mechanism maps uint8 images ``(B, H, W, C)`` (value range 255) to uint8 images of the same
shape, drawing its noise from a :class:`NoiseSource`. The registered mechanisms (docs/privacy.md):

- ``singh-sikka``: replica of the APTOS local-DP data of Naidu et al. (2021): ONE Laplace(255/ε)
  draw per image added to every value, rounded and clipped. No guarantee for the image content.
- ``pixel-laplace``: independent Laplace(255/ε) per value: ε-DP per value, n·ε per image of n values.
- ``pixel-gaussian``: independent Gaussian per value, σ from the analytic Gaussian mechanism
  (Balle & Wang 2018) for (ε, δ) and sensitivity 255; per image the n values form one Gaussian
  mechanism of L2 sensitivity 255·√n, whose exact ε at the same δ is reported.
- ``dp-pix`` (Fan 2018): b×b cell means plus Laplace noise; ε-DP for images differing in ≤ m pixels.

Rounding and clipping to [0, 255] are post-processing and never weaken a guarantee. The stated
guarantees are those of the ideal real-valued mechanisms; floating-point noise can leak through
its low-order bits (Mironov 2012), which rounding to integer levels mitigates but does not formally rule out.

Noise is drawn as uniforms from a seeded generator (reproducible) or from OS entropy
(``secure=True``, for real releases) and turned into Laplace / Gaussian draws by the same
inverse-CDF transforms, so both paths are tested alike.

This module must stay cheap to import (``dpcam.config`` imports ``MECHANISMS`` to validate
names): only numpy at the top; scipy.special, Pillow, matplotlib and tqdm are imported where used.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dpcam import guard
from dpcam.config import LdpConfig
from dpcam.data import store
from dpcam.errors import UserError
from dpcam.layout import LDP_ROOT, PREPARED_ROOT, format_eps, write_atomic, write_bytes
from dpcam.registry import Registry

VALUE_RANGE = 255.0
#: values (H·W·C) noised per batch: bounds the float64 noise buffers to ~8 MiB each
BATCH_VALUES = 1 << 20

# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8)
# --------------------------------------------------------------------------------------------


def _log1mexp(d: float) -> float:
    """log(1 - e^d) for d < 0, accurate everywhere."""
    return math.log(-math.expm1(d)) if d > -math.log(2.0) else math.log1p(-math.exp(d))


def gaussian_log_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """log δ(ε) of the Gaussian mechanism N(0, σ²) with L2 sensitivity Δ (exact, Balle & Wang 2018).

    δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ), evaluated in log space with ``log_ndtr`` so that
    image-level ε in the thousands does not overflow ``e^ε``. Returns ``-inf`` where δ underflows.
    """
    from scipy.special import log_ndtr

    r = sensitivity / sigma
    la = float(log_ndtr(r / 2 - epsilon / r))
    lb = epsilon + float(log_ndtr(-r / 2 - epsilon / r))
    d = lb - la
    if not d < 0:  # δ is below float resolution
        return -math.inf
    return la + _log1mexp(d)


def _bisect_log(f, lo: float, hi: float, rtol: float = 1e-13) -> float:
    """Root of a decreasing f on (lo, hi) with f(lo) > 0 ≥ f(hi), bisecting in log space."""
    for _ in range(400):
        if hi / lo - 1 <= rtol:
            break
        mid = math.sqrt(lo * hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest σ whose Gaussian mechanism with L2 sensitivity Δ is (ε, δ)-DP (analytic calibration).

    δ(ε, σ) decreases in σ; σ is found by bisection on log σ to relative precision 1e-13 (the
    returned σ errs on the safe, larger side). For ε=1, δ=1e-5, Δ=1: σ ≈ 3.73 (the classic
    √(2 ln(1.25/δ))/ε ≈ 4.84 is looser and only valid for ε < 1).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_target = math.log(delta)

    def f(sigma: float) -> float:
        return gaussian_log_delta(epsilon, sigma, sensitivity) - log_target

    lo = hi = float(sensitivity)
    while f(lo) <= 0:
        lo /= 2
    while f(hi) > 0:
        hi *= 2
    return _bisect_log(f, lo, hi)


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest ε at which N(0, σ²) with L2 sensitivity Δ is (ε, δ)-DP (exact; ``inf`` if unbounded).

    Solves δ(ε) = δ by bisection (δ(ε) decreases in ε); 0 when δ(0) ≤ δ already. Finite for any
    σ > 0 and δ > 0; ``math.inf`` is returned only if the root lies beyond 1e300.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_target = math.log(delta)

    def f(eps: float) -> float:
        return gaussian_log_delta(eps, sigma, sensitivity) - log_target

    if f(0.0) <= 0:
        return 0.0
    lo, hi = 1e-300, 1.0
    while f(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1e300:
            return math.inf
    return _bisect_log(f, lo, hi)


# --------------------------------------------------------------------------------------------
# Mechanisms
# --------------------------------------------------------------------------------------------

MECHANISMS: Registry[type[Mechanism]] = Registry("mechanism")  # @MECHANISMS.add on a Mechanism class with its name


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, H, W, C), got {images.dtype} {images.shape}")


def _check_epsilon(epsilon: Any, where: str) -> float:
    """ε as a float, or a UserError when it is not a finite number > 0."""
    try:
        eps = math.nan if isinstance(epsilon, bool) else float(epsilon)
    except (TypeError, ValueError):
        eps = math.nan
    if not (eps > 0 and math.isfinite(eps)):
        raise UserError(f"ε = {epsilon!r} ({where}): must be a finite number > 0, e.g. --epsilon 1")
    return eps


def _finite(x: float) -> float | None:
    """JSON-safe number: ``None`` stands for an unbounded (infinite) ε."""
    return float(x) if math.isfinite(x) else None


def _n_values(image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(H, W, C, n = H·W·C) of an image shape (H, W, C), or (H, W) for one channel."""
    h, w, *rest = image_shape
    c = rest[0] if rest else 1
    return int(h), int(w), int(c), int(h) * int(w) * int(c)


class Mechanism:
    """A local-DP mechanism on uint8 images (value range 255).

    Subclasses set their noise in ``__init__``, implement ``apply`` and ``guarantee`` and are
    registered with ``@MECHANISMS.add`` (under their ``name``). All take the same arguments, so a config section
    builds any of them (:meth:`from_config`); each reports only the parameters it uses.
    """

    name: ClassVar[str] = ""

    def __init__(self, epsilon: float, delta: float = 1e-5, b: int = 4, m: int = 1):
        epsilon = _check_epsilon(epsilon, f"mechanism {self.name!r}")
        if not 0 < delta < 1:
            raise UserError(f"ldp.delta = {delta!r}: must be in (0, 1)")
        if int(b) != b or b < 1 or int(m) != m or m < 1:
            raise UserError(f"ldp.dp_pix b = {b!r}, m = {m!r}: both must be integers ≥ 1")
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.b = int(b)
        self.m = int(m)

    @classmethod
    def from_config(cls, epsilon: float, cfg: LdpConfig) -> Mechanism:
        return cls(epsilon, delta=cfg.delta, b=cfg.dp_pix.b, m=cfg.dp_pix.m)

    def params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """The parameters that define the noise on images of ``image_shape`` (H, W[, C]) (JSON-ready)."""
        raise NotImplementedError

    def apply(self, images: np.ndarray, noise: NoiseSource) -> np.ndarray:
        """uint8 (B, H, W, C) → noised uint8 (B, H, W, C)."""
        raise NotImplementedError

    def guarantee(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """What the output protects, for images of ``image_shape`` (H, W[, C]); JSON-ready.

        Keys: ``scope`` ("per value" | "per image" | "none"), ``neighbours`` (what may differ),
        ``epsilon``/``delta`` for that scope, ``image_epsilon``/``image_delta`` for two arbitrary
        images of this shape (``None`` = unbounded), ``values`` (n = H·W·C) and ``words``.
        """
        raise NotImplementedError


def _add_round_clip(images: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """uint8 images + float32 noise (broadcastable) → rounded, clipped uint8 (in place on a float copy)."""
    x = images.astype(np.float32)
    x += noise
    np.rint(x, out=x)
    np.clip(x, 0, VALUE_RANGE, out=x)
    return x.astype(np.uint8)


@MECHANISMS.add
class SinghSikka(Mechanism):
    """Replica of the paper's APTOS local-DP images: one Laplace(255/ε) offset per image.

    One draw L ~ Laplace(0, 255/ε) per image is rounded and added to every value (all pixels,
    all channels), then clipped to [0, 255]: out = clip(x + rint(L), 0, 255), the same as rounding
    x + L up to ties. This hides only the image's mean brightness: a uniform shift of the image is
    ε-DP, but any other difference (a lesion, a structure) passes through unchanged, so there is no
    ε for the image content, per value or per image.
    """

    name = "singh-sikka"

    def params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        return {"scale": VALUE_RANGE / self.epsilon, "draws": "one per image, shared by all values"}

    def apply(self, images: np.ndarray, noise: NoiseSource) -> np.ndarray:
        _check_images(images)
        offsets = np.rint(noise.laplace((images.shape[0],), VALUE_RANGE / self.epsilon))
        return _add_round_clip(images, offsets[:, None, None, None])

    def guarantee(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        h, w, c, n = _n_values(image_shape)
        return {
            "scope": "none",
            "neighbours": "none: no notion of neighbouring images is protected",
            "epsilon": None,
            "delta": None,
            "image_epsilon": None,
            "image_delta": None,
            "brightness_epsilon": self.epsilon,
            "values": n,
            "words": (
                f"no image-level guarantee: one Laplace(255/ε) offset (ε = {format_eps(self.epsilon)}) "
                "is shared by all "
                f"{n} values of a {h}×{w}×{c} image, so it hides only the mean brightness (a uniform shift of up to "
                "255 levels is ε-DP); any other change, such as a lesion, shows through unchanged, so the image "
                "content has no ε at all, not even per value. Kept only to replicate the paper's APTOS LDP data."
            ),
        }


@MECHANISMS.add
class PixelLaplace(Mechanism):
    """Independent Laplace(255/ε) noise on every value: ε-DP per value, n·ε per image (n = H·W·C)."""

    name = "pixel-laplace"

    def params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        return {"scale": VALUE_RANGE / self.epsilon, "sensitivity": VALUE_RANGE}

    def apply(self, images: np.ndarray, noise: NoiseSource) -> np.ndarray:
        _check_images(images)
        return _add_round_clip(images, noise.laplace(images.shape, VALUE_RANGE / self.epsilon))

    def guarantee(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        h, w, c, n = _n_values(image_shape)
        image_eps = n * self.epsilon
        return {
            "scope": "per value",
            "neighbours": "images that differ in one value (one channel of one pixel)",
            "epsilon": self.epsilon,
            "delta": 0.0,
            "image_epsilon": image_eps,
            "image_delta": 0.0,
            "values": n,
            "words": (
                f"ε = {format_eps(self.epsilon)} per pixel value (pure DP); a whole {h}×{w}×{c} image has {n} values, "
                f"so two arbitrary images are protected only at ε = {n}·{format_eps(self.epsilon)} = {image_eps:g} "
                f"(composition; exact, as the image's L1 sensitivity is 255·{n}): no meaningful image-level protection."
            ),
        }


@MECHANISMS.add
class PixelGaussian(Mechanism):
    """Independent Gaussian noise on every value, σ from the analytic Gaussian mechanism.

    σ is the smallest with (ε, δ)-DP per value (sensitivity 255; Balle & Wang 2018). For a whole
    image the n = H·W·C Gaussians are one Gaussian mechanism with L2 sensitivity 255·√n, whose
    exact ε at the same δ is the reported image-level figure.
    """

    name = "pixel-gaussian"

    def __init__(self, epsilon: float, delta: float = 1e-5, b: int = 4, m: int = 1):
        super().__init__(epsilon, delta, b, m)
        self.sigma = analytic_gaussian_sigma(self.epsilon, self.delta, VALUE_RANGE)

    def params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "sigma": self.sigma,
            "sensitivity": VALUE_RANGE,
            "calibration": "analytic Gaussian (Balle & Wang 2018)",
        }

    def apply(self, images: np.ndarray, noise: NoiseSource) -> np.ndarray:
        _check_images(images)
        return _add_round_clip(images, noise.gaussian(images.shape, self.sigma))

    def guarantee(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        h, w, c, n = _n_values(image_shape)
        image_eps = analytic_gaussian_epsilon(self.sigma, self.delta, VALUE_RANGE * math.sqrt(n))
        shown = f"{image_eps:.4g}" if math.isfinite(image_eps) else "unbounded (inf)"
        return {
            "scope": "per value",
            "neighbours": "images that differ in one value (one channel of one pixel)",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "image_epsilon": _finite(image_eps),
            "image_delta": self.delta,
            "values": n,
            "words": (
                f"(ε = {format_eps(self.epsilon)}, δ = {self.delta:g}) per pixel value, σ = {self.sigma:.4g}; the {n} "
                f"values of a {h}×{w}×{c} image form one Gaussian mechanism with L2 sensitivity 255·√{n}, so two "
                f"arbitrary images are protected only at (ε = {shown}, δ = {self.delta:g}) (exact, analytic Gaussian): "
                "no meaningful image-level protection."
            ),
        }


def _cell_sums(blocks: np.ndarray) -> np.ndarray:
    """uint8 (B, nh, bh, nw, bw, C) → uint32 (B, nh, nw, C) block sums, exact.

    Sums by strided slices (bh + bw vectorised adds), several times faster than ``sum(axis=(2, 4))``
    on these small inner axes; uint16 partial sums while they cannot overflow.
    """
    bsz, nh, bh, nw, bw, c = blocks.shape
    rows = np.zeros((bsz, nh, bh, nw, c), np.uint16 if bw * 255 < 2**16 else np.uint32)
    for j in range(bw):
        rows += blocks[:, :, :, :, j, :]
    out = np.zeros((bsz, nh, nw, c), np.uint32 if bh * bw * 255 < 2**32 else np.uint64)
    for i in range(bh):
        out += rows[:, :, i]
    return out


@MECHANISMS.add
class DpPix(Mechanism):
    """DP-Pix (Fan 2018): b×b cell means per channel plus Laplace noise; ε-DP for ≤ m changed pixels.

    Each cell-channel mean gets Laplace noise of scale C·255·m/(a·ε), a = the cell's pixel count
    (b² for full cells), C = channels. Departure from Fan (grey images, 255·m/(b²ε)):
    a changed RGB pixel moves C cell-channel means by up to 255/a each, so the L1 sensitivity and
    the scale are C times larger. Images whose H or W is not a multiple of b get smaller edge
    cells (the last row/column of cells); their means are taken over the pixels they have, and
    their noise scale uses their own area a, so every changed pixel costs exactly ε/m wherever it
    lies (the Laplace mechanism with per-coordinate scales: Σ_j |Δ_j|/λ_j ≤ m·C·(255/a)/λ = ε).
    Output: each cell filled with its rounded, clipped noisy mean (uint8). Two arbitrary images
    (all H·W pixels differ) are ε·H·W/m apart by the same sum.
    """

    name = "dp-pix"

    def __init__(self, epsilon: float, delta: float = 1e-5, b: int = 4, m: int = 1):
        super().__init__(epsilon, delta, b, m)

    def scale(self, channels: int, pixels: int | np.ndarray) -> float | np.ndarray:
        """Laplace scale of a cell-channel mean: C·255·m/(a·ε) for C ``channels`` and a cell of a = ``pixels``."""
        return channels * VALUE_RANGE * self.m / (pixels * self.epsilon)

    def params(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """b, m, the channel count C and the scale of full cells; ``edge_cells``: the smaller cells of an image
        whose H or W is not a multiple of b, by pixel count a (how many, and their larger scale)."""
        h, w, c, _ = _n_values(image_shape)
        counts = self.cell_counts(h, w)
        full = int(counts.max())  # b² unless the image is smaller than a cell
        areas, number = np.unique(counts[counts < full], return_counts=True)
        return {
            "b": self.b,
            "m": self.m,
            "channels": c,
            "cell_pixels": full,
            "scale": float(self.scale(c, full)),
            "scale_formula": f"C·255·m/(a·ε), C = {c} channel(s), a = pixels in the cell ({full} in full cells)",
            "edge_cells": [
                {"pixels": int(a), "cells": int(k), "scale": float(self.scale(c, int(a)))}
                for a, k in zip(areas, number)
            ],
        }

    def cell_counts(self, h: int, w: int) -> np.ndarray:
        """int64 (ceil(H/b), ceil(W/b)): pixels per cell (b² inside, fewer in edge cells)."""
        rows = np.minimum(self.b, h - self.b * np.arange(-(-h // self.b)))
        cols = np.minimum(self.b, w - self.b * np.arange(-(-w // self.b)))
        return np.outer(rows, cols)

    def apply(self, images: np.ndarray, noise: NoiseSource) -> np.ndarray:
        _check_images(images)
        bsz, h, w, c = images.shape
        bh, bw = min(self.b, h), min(self.b, w)  # a cell never needs to be larger than the image
        nh, nw = -(-h // bh), -(-w // bw)
        x = images
        if nh * bh != h or nw * bw != w:
            x = np.pad(x, ((0, 0), (0, nh * bh - h), (0, nw * bw - w), (0, 0)))
        sums = _cell_sums(x.reshape(bsz, nh, bh, nw, bw, c))  # (B, nh, nw, C)
        counts = self.cell_counts(h, w)
        means = (sums / counts[None, :, :, None]).astype(np.float32)
        scale = self.scale(c, counts)[None, :, :, None]
        means += noise.laplace((bsz, nh, nw, c), scale)
        np.rint(means, out=means)
        np.clip(means, 0, VALUE_RANGE, out=means)
        cells = means.astype(np.uint8)
        full = np.broadcast_to(cells[:, :, None, :, None, :], (bsz, nh, bh, nw, bw, c)).reshape(
            bsz, nh * bh, nw * bw, c
        )
        return np.ascontiguousarray(full[:, :h, :w])

    def guarantee(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        h, w, c, n = _n_values(image_shape)
        image_eps = self.epsilon * h * w / self.m
        p = self.params(image_shape)
        full = p["cell_pixels"]
        edges = (
            "; edge cells (H or W not a multiple of b) keep only their own a pixels and get the larger scale "
            + ", ".join(f"{e['scale']:.4g} ({e['cells']} cell(s) of {e['pixels']} px)" for e in p["edge_cells"])
            + ", so every changed pixel still costs ε/m"
            if p["edge_cells"]
            else ""
        )
        return {
            "scope": "per image",
            "neighbours": f"images that differ in at most m = {self.m} pixel(s) (all channels)",
            "epsilon": self.epsilon,
            "delta": 0.0,
            "image_epsilon": image_eps,
            "image_delta": 0.0,
            "values": n,
            "words": (
                f"ε = {format_eps(self.epsilon)} (pure DP) for any two {h}×{w}×{c} images that differ in at most "
                f"{self.m} pixel(s); cells of up to {self.b}×{self.b} pixels, Laplace noise on each of the {c} "
                f"channel mean(s) of a cell, scale C·255·m/(a·ε) = {c}·255·{self.m}/({full}·ε) = {p['scale']:.4g} "
                f"for full cells of a = {full} pixels{edges}. Two arbitrary images (all {h * w} pixels differ) "
                f"are protected only at ε·{h * w}/{self.m} = {image_eps:g}."
            ),
        }


# --------------------------------------------------------------------------------------------
# Derivation (`dpcam ldp`) and figures
# --------------------------------------------------------------------------------------------


def _sample_indices(labels: np.ndarray, k: int) -> np.ndarray:
    """k fixed image indices, round-robin over the classes (first image of each class, then the second, ...)."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out: list[int] = []
    for rank in range(max((p.size for p in per_class), default=0)):
        for p in per_class:
            if rank < p.size and len(out) < k:
                out.append(int(p[rank]))
    return np.array(sorted(out), dtype=np.int64)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _samples_png(clean: np.ndarray, noised: np.ndarray, title: str) -> bytes:
    """PNG bytes: a title line, the clean images (top row) and their noised versions (bottom row).

    ``clean``, ``noised``: uint8 (k, H, W, 3). Small images are enlarged (nearest) to ≥ 96 px.
    """
    import io

    from PIL import Image, ImageDraw

    k, h, w, _ = clean.shape
    f = max(1, math.ceil(96 / max(h, w)))
    gap, top = 4, 22
    canvas = Image.new("RGB", (k * (w * f + gap) + gap, top + 2 * (h * f + gap)), "white")
    for row, imgs in enumerate((clean, noised)):
        for i in range(k):
            tile = Image.fromarray(imgs[i]).resize((w * f, h * f), Image.NEAREST)
            canvas.paste(tile, (gap + i * (w * f + gap), top + row * (h * f + gap)))
    ImageDraw.Draw(canvas).text((gap, 4), title, fill="black", font=_font(13))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def derive(
    dataset_dir: Path,
    mechanism: str,
    epsilon: float,
    cfg: LdpConfig,
    out_root: Path = LDP_ROOT,
    progress: bool = True,
) -> Path:
    """Write the local-DP derivative ``out_root/<dataset>/<mechanism>-eps<ε>/`` of a prepared dataset.

    Every image of ``dataset_dir`` is noised in batches of about ``BATCH_VALUES`` values (bounded
    memory; a progress bar when ``progress``); labels, masks (ground truth, copied unchanged) and
    splits are the source's. The manifest records the source (folder and manifest checksums), the
    mechanism with its parameters, its guarantee for this image size, ``secure`` and ``seed``
    (null when secure). Noise: ``NoiseSource(cfg.seed, stream=(mechanism, ε))``, so the same seed
    gives the same bytes, and each mechanism × ε gets its own independent stream; with
    ``cfg.secure`` it comes from OS entropy. Also writes ``samples.png`` (6 fixed images, clean
    above noised). Written atomically (``store.DatasetWriter``). Returns the output folder.
    """
    mechanism_class = MECHANISMS.lookup(mechanism)
    epsilon = _check_epsilon(epsilon, f"dpcam ldp {mechanism}")
    dataset_dir = Path(dataset_dir)
    src = _clean_source(dataset_dir)
    mech = mechanism_class.from_config(epsilon, cfg)
    name = str(src.manifest.get("dataset") or dataset_dir.name)
    out = Path(out_root) / name / f"{mechanism}-eps{format_eps(epsilon)}"
    noise = _derivative_noise(mechanism, epsilon, cfg)
    picks = _sample_indices(src.labels, 6)
    n, h, w, _ = src.images.shape
    with store.DatasetWriter(out, n, h, w, with_masks=src.masks is not None) as writer:
        desc = f"{name} {mechanism} ε={format_eps(epsilon)}"
        samples = _noise_into(writer, src, mech, noise, picks, desc, progress)
        manifest = _derivative_manifest(name, dataset_dir, src, mechanism, mech, cfg, picks)
        png = _samples_png(
            np.asarray(src.images[picks]),
            samples,
            f"{name}: clean (top) vs {mechanism} eps={format_eps(epsilon)} (bottom)",  # the bitmap font has no ε
        )
        writer.finish(src.labels, {k: v.copy() for k, v in src.splits.items()}, manifest)
    write_bytes(out / "samples.png", png)
    return out


def _clean_source(dataset_dir: Path) -> store.PreparedDataset:
    """The prepared dataset at ``dataset_dir``; UserError when there is none or it is itself a derivative."""
    if not (dataset_dir / "manifest.json").is_file():
        raise UserError(f"{dataset_dir}: no prepared dataset here (no manifest.json); run `dpcam prepare` first")
    src = store.load_dataset(dataset_dir)
    if src.manifest.get("kind") == "ldp":
        raise UserError(
            f"{dataset_dir}: is itself a local-DP derivative; "
            "derive from the prepared dataset in data/prepared/ instead"
        )
    return src


def _derivative_noise(mechanism: str, epsilon: float, cfg: LdpConfig) -> NoiseSource:
    """The noise of one derivative: seeded by ``cfg.seed`` on the stream of (mechanism, ε), or secure."""
    stream = (zlib.crc32(mechanism.encode()), zlib.crc32(format_eps(epsilon).encode()))
    return NoiseSource(None if cfg.secure else cfg.seed, secure=cfg.secure, stream=stream)


def _noise_into(
    writer: store.DatasetWriter,
    src: store.PreparedDataset,
    mech: Mechanism,
    noise: NoiseSource,
    picks: np.ndarray,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Fill ``writer`` with the noised images of ``src`` (masks copied), batch by batch in order, so the
    bytes do not depend on ``BATCH_VALUES``. Returns the noised images at ``picks``, uint8 (k, H, W, C)."""
    from tqdm import tqdm

    n, h, w, c = src.images.shape
    per_batch = max(1, BATCH_VALUES // (h * w * c))
    samples = np.empty((picks.size, h, w, c), np.uint8)
    with tqdm(total=n, unit="img", desc=desc, disable=None if progress else True) as bar:
        for start in range(0, n, per_batch):
            stop = min(n, start + per_batch)
            noised = mech.apply(np.asarray(src.images[start:stop]), noise)
            writer.images[start:stop] = noised
            if writer.masks is not None:
                writer.masks[start:stop] = src.masks[start:stop]
            inside = (picks >= start) & (picks < stop)
            samples[inside] = noised[picks[inside] - start]
            bar.update(stop - start)
    return samples


def _derivative_manifest(
    name: str,
    dataset_dir: Path,
    src: store.PreparedDataset,
    mechanism: str,
    mech: Mechanism,
    cfg: LdpConfig,
    picks: np.ndarray,
) -> dict[str, Any]:
    """The manifest fields of a derivative (``store.DatasetWriter.finish`` adds counts and checksums)."""
    _, h, w, c = src.images.shape
    return {
        "dataset": name,
        "kind": "ldp",
        "classes": src.classes,
        "image_size": src.manifest.get("image_size", h),
        "seed": None if cfg.secure else int(cfg.seed),
        "secure": bool(cfg.secure),
        "source": {"dataset_dir": str(dataset_dir), "manifest_checksums": src.manifest.get("checksums", {})},
        "mechanism": {"name": mechanism, "epsilon": mech.epsilon, **mech.params((h, w, c))},
        "guarantee": mech.guarantee((h, w, c)),
        "sample_indices": picks.tolist(),
    }


def figure_ldp(dataset: str, out: Path, root: Path = LDP_ROOT, prepared: Path = PREPARED_ROOT) -> Path:
    """Clean-vs-ε grid PNG of every local-DP derivative of ``dataset`` found under ``root/<dataset>/``.

    One block of 4 rows per mechanism (the same 4 fixed images in every block): the clean image,
    then one column per ε in increasing order, labelled. Raises ``UserError`` when nothing has
    been derived, the prepared dataset is missing, or a derivative was made from other clean data.
    """
    found = _find_derivatives(Path(root) / dataset, dataset)
    clean_dir = Path(prepared) / dataset
    if not (clean_dir / "manifest.json").is_file():
        raise UserError(f"{clean_dir}: no prepared dataset {dataset!r}; run `dpcam prepare --dataset {dataset}` first")
    clean = store.load_dataset(clean_dir)
    picks = _sample_indices(clean.labels, 4)
    blocks = _derivative_blocks(found, clean, clean_dir, picks, dataset)
    fig = _grid_figure(dataset, clean, picks, blocks)
    return write_atomic(Path(out), lambda tmp: fig.savefig(tmp, format="png"))


def _find_derivatives(base: Path, dataset: str) -> dict[str, list[tuple[float, Path]]]:
    """Mechanism name -> [(ε, folder)] of the derivatives under ``base``; UserError when there is none."""
    found: dict[str, list[tuple[float, Path]]] = {}
    for mpath in sorted(base.glob("*/manifest.json")):
        man = guard.read_json(mpath, fix=f"derive it again (`dpcam ldp --dataset {dataset}`)")
        if man.get("kind") != "ldp":
            continue
        found.setdefault(man["mechanism"]["name"], []).append((float(man["mechanism"]["epsilon"]), mpath.parent))
    if not found:
        raise UserError(f"{base}: no local-DP derivatives of {dataset!r}; run `dpcam ldp --dataset {dataset}` first")
    return found


def _derivative_blocks(found, clean: store.PreparedDataset, clean_dir: Path, picks: np.ndarray, dataset: str) -> list:
    """[(mechanism, [(ε, images at picks)])], mechanisms by name and ε increasing; UserError for a
    derivative whose source images are not ``clean``'s (by the checksum of images.npy)."""
    clean_sum = clean.manifest.get("checksums", {}).get("images.npy")
    blocks = []
    for mech in sorted(found):
        cols = []
        for eps, path in sorted(found[mech]):
            d = store.load_dataset(path)
            if d.manifest["source"]["manifest_checksums"].get("images.npy") != clean_sum:
                raise UserError(
                    f"{path}: was derived from other images than {clean_dir}; rerun `dpcam ldp --dataset {dataset}`"
                )
            cols.append((eps, np.asarray(d.images[picks])))
        blocks.append((mech, cols))
    return blocks


def _grid_figure(dataset: str, clean: store.PreparedDataset, picks: np.ndarray, blocks: list):
    """The matplotlib Figure of ``figure_ldp``: per block one row per pick, clean image then each ε."""
    from matplotlib.figure import Figure

    k = picks.size
    ncol = 1 + max(len(cols) for _, cols in blocks)
    nrow = k * len(blocks)
    fig = Figure(figsize=(1.25 * ncol + 0.6, 1.25 * nrow + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    clean_imgs = np.asarray(clean.images[picks])
    for bi, (mech, cols) in enumerate(blocks):
        for r in range(k):
            row = bi * k + r
            panels = [("clean", clean_imgs[r])] + [(f"ε = {format_eps(e)}", imgs[r]) for e, imgs in cols]
            _grid_row(axes[row], panels, titled=r == 0)
            cls = clean.classes[int(clean.labels[picks[r]])]
            axes[row, 0].set_ylabel(f"{mech}\n{cls}" if r == 0 else cls, fontsize=8)
    fig.suptitle(f"{dataset}: clean vs local-DP derivatives", fontsize=10)
    return fig


def _grid_row(axes, panels: list[tuple[str, np.ndarray]], titled: bool) -> None:
    """Draw (label, image) ``panels`` into a row of ``axes``, titled when ``titled``; spare axes are hidden."""
    for ci, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if ci >= len(panels):
            ax.axis("off")
            continue
        label, img = panels[ci]
        ax.imshow(img, interpolation="nearest")
        if titled:
            ax.set_title(label, fontsize=8)
