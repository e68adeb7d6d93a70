"""Local-DP image mechanisms (a registry by name) and their guarantees.

Every mechanism maps uint8 images ``(B, H, W, C)`` (value range 255) to uint8 images of the same
shape, drawing its noise from a :class:`dpcam.data.noise.NoiseSource`. The registered mechanisms
(docs/privacy.md):

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

numpy is its only third-party import at the top (config validates mechanism names against :mod:`dpcam.names`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from dpcam.config import LdpConfig
from dpcam.data.analytic_gaussian import analytic_gaussian_epsilon, analytic_gaussian_sigma
from dpcam.data.noise import NoiseSource
from dpcam.errors import UserError
from dpcam.layout import format_eps
from dpcam.registry import Registry

VALUE_RANGE = 255.0

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
