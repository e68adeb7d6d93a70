"""Built-in dataset ``synthetic-fundus``: procedurally drawn colour fundus photographs with
diabetic-retinopathy-like lesions whose kinds and counts define grades 0-4 (APTOS scale), and a
binary lesion mask per image.

Each image is a dark frame holding a circular retina (warm orange-red albedo with low-frequency
texture and a darker macula), an optic disc with a pale cup near one side, a vessel tree (four
arcades of veins and arteries growing from the disc as jittered random walks with random branching
and tapering width), look-alikes that healthy eyes have too and that are not lesions (0-4 pigment
dots, 0-3 drusen, 0-2 patches of nerve-fibre sheen), defocus, illumination variation (vignetting,
a tilted light gradient, gain and colour cast) and sensor noise. Lesions by grade (counts are
drawn uniformly from ``LESION_COUNTS``):

====== ==========================================================================================
grade  lesions
====== ==========================================================================================
0      none
1      1-4 microaneurysms (tiny dark-red dots)
2      3-8 microaneurysms + 1-4 haemorrhages (larger dark-red blotches)
3      4-10 microaneurysms + 3-8 haemorrhages + 1-2 clusters of hard exudates (small yellow
       spots) + 1-2 cotton-wool spots (pale, fluffy)
4      as 3 + 1-2 neovascular tufts (tangles of thin red vessels, at the disc or on an arcade)
====== ==========================================================================================

Lesion sizes are in units of ``u = size / 64 * lesion_scale`` pixels (a microaneurysm has a
radius of 0.45-0.9 u, at 40-85% opacity). A lesion smaller than a pixel is drawn as one pixel
with its contrast reduced by its area, as a camera would record it, so it stays in the mask but
fades into the noise. The mask is the union of pixels that some lesion covers by at least
``MASK_COVERAGE``; look-alikes are not in it.

Difficulty (measured, not a test): a small 4-block CNN trained without privacy on 3000 images at
64 px (uniform balance) reached 0.89 test accuracy at ``lesion_scale`` 1 (0.68 at 0.7, 0.82 at
0.85, 0.91 at 1.2, 0.95 at 1.5; 0.91 with 10000 images); its errors are mostly grade 0 vs 1.

Determinism: image ``i`` draws fixed-shape blocks of random numbers (``_DRAWS``) from its own
generator ``default_rng([seed, 1, i])``, the labels come from ``default_rng([seed, 0, n])``, and
rendering is element-wise numpy (no BLAS), so the bytes depend neither on ``workers`` nor on
``CHUNK``.

Speed: after the per-image draws, a chunk of images is built at once: the geometry of all vessel
trees and lesions by array operations over the chunk, vessel and neovascular segments as clipped
distance fields evaluated in small patches, blobs as elliptic distance fields in patches, both
scattered into the chunk with ``np.maximum.at`` and composited at their pixels only; full-frame
layers (retina, shading, macula, light, blur, noise) by broadcasting. Chunks go to a process pool.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from dpcam.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from dpcam.config import PrepareConfig

GRADES = 5
CLASSES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
APTOS_SHARES = (0.493, 0.101, 0.273, 0.053, 0.080)  # APTOS 2019 train.csv class shares, grades 0-4
GENERATOR_VERSION = 1
CHUNK = 32  # most images per unit of work (fewer for large sizes); the output does not depend on it
MIN_SIZE = 16
MASK_COVERAGE = 0.25  # a pixel is a lesion pixel when a lesion covers at least this share of it

LESION_KINDS = ("microaneurysm", "haemorrhage", "exudate_cluster", "cotton_wool_spot", "neovascular_tuft")
# LESION_COUNTS[grade, kind] = (low, high), inclusive; kinds in the order of LESION_KINDS.
LESION_COUNTS = np.array(
    [
        [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0)],
        [(1, 4), (0, 0), (0, 0), (0, 0), (0, 0)],
        [(3, 8), (1, 4), (0, 0), (0, 0), (0, 0)],
        [(4, 10), (3, 8), (1, 2), (1, 2), (0, 0)],
        [(4, 10), (3, 8), (1, 2), (1, 2), (1, 2)],
    ],
    dtype=np.int64,
)

# Blob channels (lesions, then look-alikes of a healthy fundus that are not lesions: pigment dots,
# drusen, nerve-fibre sheen) and segment channels (drawn as line segments).
_MA, _HE, _EX, _CWS, _PIG, _DRU, _SHEEN = range(7)
_LESION_BLOBS = 4  # blob channels below this are lesions (in the mask)
_VEIN, _ARTERY, _NV = range(3)
_F = np.float32


# --------------------------------------------------------------------------------------- labels


def class_counts(n: int, balance="uniform") -> np.ndarray:
    """Exact number of images per grade for ``n`` images.

    ``balance`` is ``"uniform"``, ``"aptos"`` (APTOS 2019 shares, about 49% grade 0) or 5
    non-negative shares for grades 0-4. Counts are ``floor(n * share)`` plus one for the grades
    with the largest remainders (ties go to the lower grade). Returns int64 (5,) summing to ``n``.
    """
    shares = _shares(balance)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UserError(f"synthetic n = {n!r}: must be a whole number >= 0; set prepare.synthetic.n")
    raw = n * shares
    counts = np.floor(raw).astype(np.int64)
    short = int(n - counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _shares(balance) -> np.ndarray:
    if isinstance(balance, str):
        if balance == "uniform":
            return np.full(GRADES, 1.0 / GRADES)
        if balance == "aptos":
            s = np.asarray(APTOS_SHARES, dtype=np.float64)
            return s / s.sum()
        raise UserError(
            f"synthetic balance = {balance!r}: unknown; use 'uniform', 'aptos' or 5 shares for grades 0-4 "
            "(prepare.synthetic.balance)"
        )
    try:
        s = np.asarray(balance, dtype=np.float64)
    except (TypeError, ValueError):
        s = np.empty(0)
    if s.shape != (GRADES,) or not np.all(np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
        raise UserError(
            f"synthetic balance = {balance!r}: give 'uniform', 'aptos' or 5 non-negative shares with a "
            "positive sum (prepare.synthetic.balance)"
        )
    return s / s.sum()


def make_labels(n: int, balance="uniform", seed: int = 0) -> np.ndarray:
    """Grades of ``n`` images: exact ``class_counts(n, balance)``, shuffled by ``seed``. int64 (n,)."""
    _check_seed(seed)
    labels = np.repeat(np.arange(GRADES, dtype=np.int64), class_counts(n, balance))
    return np.random.default_rng([seed, 0, n]).permutation(labels)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"synthetic seed = {seed!r}: must be a whole number in [0, 2**32); set prepare.seed")


# ------------------------------------------------------------------------------ random draws
#
# Every image draws the same fixed-shape blocks of random numbers from its own generator (in the
# order of _DRAWS); all geometry is then computed for a whole chunk at once from the stacked
# blocks. Slots a grade does not use (a fourth exudate cluster, say) are drawn and ignored, so an
# image's numbers never depend on the other images of its chunk.

_NT = 20  # most steps of a vessel polyline
_K1, _K2 = 4, 2  # most side branches per trunk, per branch
_C = 4  # candidate positions per lesion (the first one clear of the optic disc is used)
_MA_MAX, _HE_MAX, _HE_SUB = 10, 8, 3
_EX_MAX, _EX_SUB, _CWS_MAX, _CWS_SUB = 2, 7, 2, 3
_NV_MAX, _NV_LOOPS, _NV_STEPS = 2, 5, 8
_PIG_MAX, _DRU_MAX, _SHEEN_MAX = 4, 3, 2  # look-alikes (any grade): 0..max each
assert LESION_COUNTS[..., 1].max(0).tolist() == [_MA_MAX, _HE_MAX, _EX_MAX, _CWS_MAX, _NV_MAX]

# Global scalars: name -> (low, high) of a uniform draw. Lengths: R in units of the image size S;
# cx, cy offsets from the frame centre in S; disc and macula geometry in R.
_GLOBALS = {
    "R": (0.45, 0.53),
    "cx": (-0.015, 0.015),
    "cy": (-0.015, 0.015),
    "side": (0, 1),
    "dr": (0.115, 0.14),
    "ddx": (0.55, 0.66),
    "ddy": (-0.08, 0.08),
    "cup": (0.3, 0.55),
    "mdx": (0.0, 0.1),
    "mdy": (-0.06, 0.06),
    "mr": (0.14, 0.22),
    "mstr": (0.15, 0.35),
    "br": (0.72, 0.9),
    "bg": (0.28, 0.42),
    "bb": (0.09, 0.18),
    "edge": (0.1, 0.3),
    "tlo": (0.04, 0.10),
    "tmid": (0.015, 0.04),
    "dcr": (0.95, 1.0),
    "dcg": (0.76, 0.88),
    "dcb": (0.42, 0.58),
    "vop": (0.75, 0.92),
    "aop": (0.6, 0.85),
    "gain": (0.78, 1.12),
    "castr": (0.93, 1.07),
    "castg": (0.92, 1.08),
    "castb": (0.87, 1.13),
    "vig": (0.2, 0.5),
    "grad": (0.0, 0.25),
    "psi": (0.0, 2 * math.pi),
    "sigma": (0.008, 0.03),
    "blur": (0.0, 0.22),  # defocus: weight of each neighbour in a separable 3-tap blur
}

# name, distribution ("u" uniform [0, 1), "z" standard normal), shape per image
_DRAWS = (
    ("glob", "u", (len(_GLOBALS),)),
    ("count", "u", (5,)),
    ("trunk", "u", (8, 5)),
    ("trunk_z", "z", (8, _NT)),
    ("child", "u", (8, _K1, 8)),
    ("child_z", "z", (8 * _K1, _NT)),
    ("gchild", "u", (8 * _K1, _K2, 8)),
    ("gchild_z", "z", (8 * _K1 * _K2, _NT)),
    ("ma_pos", "u", (_MA_MAX, _C, 2)),
    ("ma", "u", (_MA_MAX, 2)),
    ("he_pos", "u", (_HE_MAX, _C, 2)),
    ("he", "u", (_HE_MAX, _HE_SUB, 4)),
    ("he_z", "z", (_HE_MAX, _HE_SUB, 2)),
    ("ex_pos", "u", (_EX_MAX, _C, 2)),
    ("ex", "u", (_EX_MAX, _EX_SUB, 5)),
    ("ex_z", "z", (_EX_MAX, _EX_SUB, 2)),
    ("cws", "u", (_CWS_MAX, _CWS_SUB, 6)),
    ("cws_z", "z", (_CWS_MAX, _CWS_SUB + 1, 2)),
    ("nv", "u", (_NV_MAX, 6)),
    ("nv_z", "z", (_NV_MAX, 2)),
    ("nv_loop", "u", (_NV_MAX, _NV_LOOPS, 4)),
    ("nv_loop_z", "z", (_NV_MAX, _NV_LOOPS, 2 + _NV_STEPS)),
    ("pig_pos", "u", (_PIG_MAX, _C, 2)),
    ("pig", "u", (_PIG_MAX, 3)),
    ("dru_pos", "u", (_DRU_MAX, _C, 2)),
    ("dru", "u", (_DRU_MAX, 3)),
    ("sheen", "u", (_SHEEN_MAX, 6)),
    ("sheen_z", "z", (_SHEEN_MAX, 2)),
    ("tex_lo", "z", (6, 6)),
    ("tex_mid", "z", (14, 14)),
)


def _image_draws(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One image's random numbers: the blocks of ``_DRAWS`` (float64) and ``noise`` float32 (3, H, W)."""
    d = {name: rng.random(shape) if kind == "u" else rng.standard_normal(shape) for name, kind, shape in _DRAWS}
    d["noise"] = rng.standard_normal((3, size, size), dtype=_F)
    return d


def _lerp(lo, hi, u):
    return lo + (hi - lo) * u


# ----------------------------------------------------------------------------- chunk geometry


@dataclass
class _Chunk:
    """Geometry of a chunk of B images, in pixels (pixel centres at integer coordinates).

    ``g``: global scalars, name -> float32 (B,) (see ``_GLOBALS``; lengths converted to pixels).
    ``segs`` float32 (S, 7) rows x0, y0, x1, y1, hw0, hw1, channel (``_VEIN``/``_ARTERY``/``_NV``;
    hw = half width) with ``seg_img`` int (S,) their image; ``blobs`` float32 (L, 8) rows
    x, y, a, b, theta, softness, opacity, channel (``_MA``/``_HE``/``_EX``/``_CWS``) with
    ``blob_img`` int (L,); ``tex_lo`` (B, 6, 6), ``tex_mid`` (B, 14, 14), ``noise`` (B, 3, H, W).
    """

    g: dict[str, np.ndarray]
    segs: np.ndarray
    seg_img: np.ndarray
    blobs: np.ndarray
    blob_img: np.ndarray
    tex_lo: np.ndarray
    tex_mid: np.ndarray
    noise: np.ndarray


def _geometry(d: dict[str, np.ndarray], grades: np.ndarray, size: int, lesion_scale: float) -> _Chunk:
    """Turn the stacked draws ``d`` (each (B, ...)) of images with ``grades`` (B,) into a chunk.

    Steps: the global scalars in pixels (``_pixel_globals``), the vessel tree, the lesion counts,
    then each kind of lesion and the look-alikes. No step draws a random number: all come from ``d``.
    """
    S = float(size)
    g = _pixel_globals(d["glob"], S)
    centre, disc, macula = (np.stack([g[x], g[y]], -1) for x, y in (("cx", "cy"), ("dx", "dy"), ("mx", "my")))
    segs, seg_img, trunk_pts, trunk_n = _vessel_tree(d, S, disc, g["side"])
    k = _lesion_counts(d["count"], grades)
    eye = _Eye(g, S, S / 64.0 * lesion_scale, k, centre, disc, macula, trunk_pts, trunk_n)
    blobs = [
        _microaneurysms(d, eye),
        _haemorrhages(d, eye),
        _exudates(d, eye),
        _cotton_wool_spots(d, eye),
        *_look_alikes(d, eye),
    ]
    nv_rows, nv_img = _neovascular_tufts(d, eye)
    gf = {name: np.asarray(v, _F) for name, v in g.items()}
    return _Chunk(
        gf,
        np.concatenate([segs, nv_rows]),
        np.concatenate([seg_img, nv_img]),
        np.concatenate([b[0] for b in blobs]),
        np.concatenate([b[1] for b in blobs]),
        d["tex_lo"].astype(_F),
        d["tex_mid"].astype(_F),
        d["noise"],
    )


def _pixel_globals(glob: np.ndarray, S: float) -> dict[str, np.ndarray]:
    """The scalars of ``_GLOBALS`` from their uniforms ``glob`` (B, len(_GLOBALS)), float64 (B,) each.

    Lengths become pixels (R from units of S, disc and macula sizes from units of R); ``cx``, ``cy``
    become the retina's centre, ``side`` -1 or +1 (disc left or right, a right eye); adds the optic
    disc centre ``dx``, ``dy`` and the macula centre ``mx``, ``my``.
    """
    g = {k: _lerp(lo, hi, glob[:, j]) for j, (k, (lo, hi)) in enumerate(_GLOBALS.items())}
    R = g["R"] = g["R"] * S
    g["cx"] = (S - 1) / 2 + g["cx"] * S
    g["cy"] = (S - 1) / 2 + g["cy"] * S
    side = g["side"] = np.where(g["side"] < 0.5, -1.0, 1.0)  # disc right (+1, a right eye) or left
    g["dr"] = g["dr"] * R
    g["dx"], g["dy"] = g["cx"] + side * g["ddx"] * R, g["cy"] + g["ddy"] * R
    g["mx"], g["my"] = g["cx"] - side * g["mdx"] * R, g["cy"] + g["mdy"] * R
    g["mr"] = g["mr"] * R
    return g


def _lesion_counts(cu: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Lesions per kind, int64 (B, 5): uniform in ``LESION_COUNTS[grade]`` from the uniforms cu (B, 5)."""
    lo, hi = LESION_COUNTS[grades, :, 0], LESION_COUNTS[grades, :, 1]
    return lo + np.floor(cu * (hi - lo + 1)).astype(np.int64)


class _Eye(NamedTuple):
    """What the lesion and look-alike steps of ``_geometry`` share, for a chunk of B images.

    ``g`` the global scalars (``_pixel_globals``); ``S`` the image size and ``u`` the lesion unit
    (``S / 64 * lesion_scale``), in pixels; ``k`` int (B, 5) lesions per kind (``LESION_KINDS``);
    ``centre``, ``disc``, ``macula`` (B, 2); ``trunk_pts`` (B, 8, N+1, 2) and ``trunk_n`` int (B, 8)
    the vessel trunks (``_vessel_tree``). Each step returns rows as ``_blob_rows`` or ``_seg_rows``.
    """

    g: dict[str, np.ndarray]
    S: float
    u: float
    k: np.ndarray
    centre: np.ndarray
    disc: np.ndarray
    macula: np.ndarray
    trunk_pts: np.ndarray
    trunk_n: np.ndarray


def _microaneurysms(d, e: _Eye):
    """Tiny round dark-red dots."""
    p = _place(d["ma_pos"], e.centre, 0.75 * e.g["R"], e.disc, 1.6 * e.g["dr"], e.S)
    r = e.u * _lerp(0.45, 0.9, d["ma"][..., 0])
    return _blob_rows(np.arange(_MA_MAX) < e.k[:, :1], p, r, r, 0 * r, 0.0, _lerp(0.4, 0.85, d["ma"][..., 1]), _MA)


def _haemorrhages(d, e: _Eye):
    """Dot-blot / flame blotches of 1-3 ellipses."""
    R = e.g["R"]
    p = _place(d["he_pos"], e.centre, 0.8 * R, e.disc, 1.6 * e.g["dr"], e.S)  # (B, 10, 2)
    hu = d["he"]
    m = 1 + np.floor(hu[:, :, 0, 3] * 3)  # sub-blobs per haemorrhage
    a = e.u * _lerp(1.0, 2.2, hu[..., 0])
    spread = (0.7 * a * (m[..., None] > 1))[..., None]
    ps = _inside(p[:, :, None, :] + d["he_z"] * spread, e.centre, 0.9 * R)
    exists = (np.arange(_HE_MAX) < e.k[:, 1:2])[..., None] & (np.arange(_HE_SUB) < m[..., None])
    op = np.broadcast_to(_lerp(0.55, 0.9, hu[:, :, 1:2, 3]), a.shape)
    return _blob_rows(exists, ps, a, a * _lerp(0.45, 1.0, hu[..., 1]), math.pi * hu[..., 2], 0.3, op, _HE)


def _exudates(d, e: _Eye):
    """Hard exudates: clusters of 2-7 small bright-yellow spots around the posterior pole."""
    p = _place(d["ex_pos"], e.macula, 0.55 * e.g["R"], e.disc, 1.8 * e.g["dr"], e.S)
    eu = d["ex"]
    m = 2 + np.floor(eu[:, :, 0, 4] * 6)
    ps = _inside(p[:, :, None, :] + d["ex_z"] * (2.4 * e.u), e.centre, 0.9 * e.g["R"])
    r = e.u * _lerp(0.45, 1.0, eu[..., 0])
    exists = (np.arange(_EX_MAX) < e.k[:, 2:3])[..., None] & (np.arange(_EX_SUB) < m[..., None])
    return _blob_rows(
        exists, ps, r, r * _lerp(0.7, 1.0, eu[..., 1]), math.pi * eu[..., 2], 0.0, _lerp(0.5, 0.9, eu[..., 3]), _EX
    )


def _cotton_wool_spots(d, e: _Eye):
    """Soft pale patches of 2-3 lobes along an arcade."""
    cu = d["cws"]
    p = _on_trunks(e.trunk_pts, e.trunk_n, cu[:, :, 0, 4], cu[:, :, 0, 5]) + d["cws_z"][:, :, 0] * (2.0 * e.u)
    m = 2 + np.floor(cu[:, :, 1, 4] * 2)
    ps = _inside(p[:, :, None, :] + d["cws_z"][:, :, 1:] * (1.0 * e.u), e.centre, 0.9 * e.g["R"])
    a = e.u * _lerp(1.1, 2.0, cu[..., 0])
    exists = (np.arange(_CWS_MAX) < e.k[:, 3:4])[..., None] & (np.arange(_CWS_SUB) < m[..., None])
    op = np.broadcast_to(_lerp(0.3, 0.55, cu[:, :, :1, 3]), a.shape)
    return _blob_rows(exists, ps, a, a * _lerp(0.6, 1.0, cu[..., 1]), math.pi * cu[..., 2], 0.7, op, _CWS)


def _neovascular_tufts(d, e: _Eye):
    """Tangles of thin looping vessels at the disc margin or along an arcade (segment rows)."""
    g, u = e.g, e.u
    nu, lu = d["nv"], d["nv_loop"]
    ang = 2 * math.pi * nu[..., 1]
    at_disc = e.disc[:, None] + (g["dr"][:, None] * _lerp(0.9, 1.3, nu[..., 2]))[..., None] * np.stack(
        [np.cos(ang), np.sin(ang)], -1
    )
    on_arcade = _on_trunks(e.trunk_pts, e.trunk_n, nu[..., 3], nu[..., 4]) + d["nv_z"] * (1.5 * u)
    p = _inside(np.where((nu[..., 0] < 0.5)[..., None], at_disc, on_arcade), e.centre, 0.85 * g["R"])  # (B, 2, 2)
    lz = d["nv_loop_z"]
    starts = p[:, :, None, :] + lz[..., :2] * (1.0 * u)
    n = 5 + np.floor(lu[..., 2] * 4).astype(np.int64)
    curv = np.where(lu[..., 1] < 0.5, -0.7, 0.7)
    pts, _, hw, valid = _walk(starts, 2 * math.pi * lu[..., 0], curv, n, 1.1 * u, 0.45 * u, 0.3 * u, 0.45 * lz[..., 2:])
    m = 3 + np.floor(nu[..., 5] * 3)  # loops per tuft
    exists = (np.arange(_NV_MAX) < e.k[:, 4:5])[..., None] & (np.arange(_NV_LOOPS) < m[..., None])
    return _seg_rows(pts, hw, valid & exists[..., None], _NV)


def _look_alikes(d, e: _Eye) -> list:
    """Features of healthy eyes too, not lesions (not in the mask), sized by the image only: pigment
    dots (small, dark brown), drusen (small, faint pale yellow) and nerve-fibre sheen (broad, faint
    pale streaks along an arcade), 0..max of each. Returns their three ``_blob_rows`` results."""
    R, avoid_r, v = e.g["R"], 1.6 * e.g["dr"], e.S / 64.0
    pu = d["pig"]
    p = _place(d["pig_pos"], e.centre, 0.85 * R, e.disc, avoid_r, e.S)
    r = v * _lerp(0.5, 0.9, pu[..., 1])
    exists = np.arange(_PIG_MAX) < np.floor(pu[:, :1, 0] * (_PIG_MAX + 1))
    pigment = _blob_rows(exists, p, r, r, 0 * r, 0.0, _lerp(0.3, 0.6, pu[..., 2]), _PIG)
    du = d["dru"]
    p = _place(d["dru_pos"], e.macula, 0.6 * R, e.disc, avoid_r, e.S)
    r = v * _lerp(0.5, 1.0, du[..., 1])
    exists = np.arange(_DRU_MAX) < np.floor(du[:, :1, 0] * (_DRU_MAX + 1))
    drusen = _blob_rows(exists, p, r, r, 0 * r, 0.0, _lerp(0.2, 0.45, du[..., 2]), _DRU)
    su = d["sheen"]
    p = _inside(
        _on_trunks(e.trunk_pts, e.trunk_n, su[..., 1], su[..., 2]) + d["sheen_z"] * (1.5 * v), e.centre, 0.9 * R
    )
    a = v * _lerp(2.0, 4.0, su[..., 3])
    exists = np.arange(_SHEEN_MAX) < np.floor(su[:, :1, 0] * (_SHEEN_MAX + 1))
    sheen = _blob_rows(exists, p, a, a * 0.45, math.pi * su[..., 4], 0.8, _lerp(0.1, 0.25, su[..., 5]), _SHEEN)
    return [pigment, drusen, sheen]


def _vessel_tree(d, S: float, disc: np.ndarray, side: np.ndarray):
    """Veins and arteries of the four arcades with two levels of side branches, for a chunk.

    disc (B, 2), side (B,) +-1. Returns segment rows float32 (S, 7) as in ``_Chunk``, their image
    int (S,), trunk vertices (B, 8, N+1, 2) and trunk step counts int (B, 8).
    """
    step = 0.03 * S
    tx = -side[:, None]  # temporal direction (towards the macula)
    vert = np.array([-1.0, 1.0, -1.0, 1.0] * 2)  # superior / inferior
    temporal = np.array([True, True, False, False] * 2)
    vein = np.arange(8) < 4
    tu = d["trunk"]
    delta = np.where(temporal, _lerp(0.95, 1.4, tu[..., 0]), _lerp(0.45, 1.05, tu[..., 0]))
    ang = np.arctan2(vert * np.sin(delta), np.where(temporal, tx, -tx) * np.cos(delta))
    n = np.where(temporal, 15 + np.floor(tu[..., 1] * 6), 8 + np.floor(tu[..., 1] * 5)).astype(np.int64)
    turn = np.where(temporal, _lerp(1.5, 2.1, tu[..., 2]) * vert * side[:, None], _lerp(-0.5, 0.5, tu[..., 2]))
    hw0 = 0.0095 * S * np.where(vein, _lerp(0.95, 1.1, tu[..., 3]), _lerp(0.7, 0.85, tu[..., 3]))
    start = np.broadcast_to(disc[:, None, :], (side.size, 8, 2))
    pts, theta, hw, valid = _walk(
        start, ang, turn / n, n, step, hw0, hw0 * _lerp(0.3, 0.45, tu[..., 4]), 0.1 * d["trunk_z"]
    )
    chan = np.broadcast_to(np.where(vein, _VEIN, _ARTERY), n.shape)
    rows = [_seg_rows(pts, hw, valid, chan)]
    level = (pts, theta, hw, n, chan)
    for name, kmin, kmax in (("child", 2, 4), ("gchild", 0, 2)):
        level = _branches(level, d[name], d[name + "_z"], kmin, kmax, step)
        rows.append(_seg_rows(level[0], level[2], np.arange(_NT) < level[3][..., None], level[4]))
    segs = np.concatenate([r[0] for r in rows])
    img = np.concatenate([r[1] for r in rows])
    return segs, img, pts, n


def _branches(parent, bu, bz, kmin: int, kmax: int, step: float):
    """Side branches of the polylines ``parent`` = (pts (B,P,N+1,2), theta (B,P,N), hw (B,P,N+1),
    n (B,P), chan (B,P)); bu (B, P, K, 8) uniforms, bz (B, P*K, N) normals. A branch slot that does
    not exist gets n = 0. Returns the same tuple for the (B, P*K) branches."""
    pts, theta, hw, n, chan = parent
    B, P, K = bu.shape[:3]
    count = kmin + np.floor(bu[:, :, :1, 0] * (kmax - kmin + 1))
    exists = (np.arange(K) < count) & (n[..., None] >= 3)
    j = 1 + np.floor(bu[..., 1] * np.maximum(n[..., None] - 1, 1)).astype(np.int64)  # spawn vertex
    j = np.minimum(j, _NT - 1)
    start = np.take_along_axis(pts, np.broadcast_to(j[..., None], (B, P, K, 2)), 2)  # (B, P, K, 2)
    base = np.take_along_axis(theta, j, 2)
    sign = np.where(bu[..., 2] < 0.5, -1.0, 1.0)
    angle = base + sign * _lerp(0.45, 1.2, bu[..., 3])
    h0 = np.take_along_axis(hw, j, 2) * _lerp(0.55, 0.8, bu[..., 4])
    nn = np.maximum(3, np.round((n[..., None] - j) * _lerp(0.4, 0.9, bu[..., 5]))).astype(np.int64)
    nn = np.where(exists, nn, 0)
    flat = lambda x: x.reshape(B, P * K, *x.shape[3:])
    cp, ct, ch, _ = _walk(
        flat(start),
        flat(angle),
        flat(_lerp(-0.08, 0.08, bu[..., 6])),
        flat(nn),
        step,
        flat(h0),
        flat(h0 * _lerp(0.3, 0.5, bu[..., 7])),
        0.12 * bz,
    )
    return cp, ct, ch, flat(nn), np.repeat(chan, K, 1)


def _walk(start, angle, curv, n, step, hw0, hw1, z):
    """Jittered random-walk polylines with linearly tapering half width, over any leading shape L.

    start (*L, 2); angle, curv (per step), hw0, hw1 (*L); n (*L) int steps; step a scalar (pixels);
    z (*L, N) the per-step angle jitter (radians). Returns pts (*L, N+1, 2), theta (*L, N)
    segment directions, hw (*L, N+1) and valid (*L, N) bool (segment j exists when j < n).
    """
    N = z.shape[-1]
    dth = curv[..., None] + z
    theta = angle[..., None] + np.cumsum(dth, -1) - dth[..., :1]
    steps = step * np.stack([np.cos(theta), np.sin(theta)], -1)
    pts = np.concatenate([start[..., None, :], start[..., None, :] + np.cumsum(steps, -2)], -2)
    frac = np.minimum(np.arange(N + 1) / np.maximum(n[..., None], 1), 1.0)
    hw0, hw1 = np.asarray(hw0)[..., None], np.asarray(hw1)[..., None]
    hw = hw0 + (hw1 - hw0) * frac
    return pts, theta, hw, np.arange(N) < n[..., None]


def _seg_rows(pts, hw, valid, chan):
    """Valid segments of polylines pts (B, *M, N+1, 2), hw (B, *M, N+1), valid (B, *M, N), chan
    scalar or (B, *M). Returns rows float32 (S, 7) (x0, y0, x1, y1, hw0, hw1, channel) and their
    image index int (S,)."""
    ch = np.broadcast_to(np.asarray(chan, np.float64)[..., None], valid.shape)
    rows = np.concatenate([pts[..., :-1, :], pts[..., 1:, :], hw[..., :-1, None], hw[..., 1:, None], ch[..., None]], -1)
    img = np.broadcast_to(np.arange(valid.shape[0]).reshape((-1,) + (1,) * (valid.ndim - 1)), valid.shape)
    return rows[valid].astype(_F), img[valid]


def _blob_rows(exists, p, a, b, theta, soft, opacity, chan):
    """Existing blobs as rows float32 (L, 8) (x, y, a, b, theta, softness, opacity, channel) and
    their image index int (L,). exists (B, *M) bool; p (B, *M, 2); a, b, theta, opacity (B, *M).

    Blobs below pixel size are drawn as a pixel-sized blob with opacity reduced by the area ratio.
    """
    ae, be = np.maximum(a, 0.5), np.maximum(b, 0.5)
    op = opacity * np.minimum(1.0, a * b / (ae * be))
    cols = [p[..., 0], p[..., 1], ae, be, theta, np.full(a.shape, soft), op, np.full(a.shape, chan)]
    rows = np.stack([np.broadcast_to(c, exists.shape) for c in cols], -1)
    img = np.broadcast_to(np.arange(exists.shape[0]).reshape((-1,) + (1,) * (exists.ndim - 1)), exists.shape)
    return rows[exists].astype(_F), img[exists]


def _place(pu, centre, radius, avoid, avoid_r, S: float):
    """Lesion positions (B, K, 2) from uniforms pu (B, K, C, 2): the first of C candidates, uniform
    in the disc (centre (B, 2), radius (B,)), that lies beyond avoid_r (B,) from avoid (B, 2) and
    1 px inside the frame; when none does, the first candidate mirrored through the centre."""
    r = radius[:, None, None] * np.sqrt(pu[..., 0])
    a = 2 * math.pi * pu[..., 1]
    p = centre[:, None, None, :] + np.stack([r * np.cos(a), r * np.sin(a)], -1)
    e = p - avoid[:, None, None, :]
    ok = (np.hypot(e[..., 0], e[..., 1]) > avoid_r[:, None, None]) & np.all((p >= 1) & (p <= S - 2), -1)
    first = np.argmax(ok, -1)[..., None, None]
    chosen = np.take_along_axis(p, np.broadcast_to(first, first.shape[:-1] + (2,)), 2)[:, :, 0]
    mirrored = np.clip(2 * centre[:, None, :] - p[:, :, 0], 1, S - 2)
    return np.where(ok.any(-1)[..., None], chosen, mirrored)


def _inside(p, centre, limit):
    """Points p (B, *M, 2) pulled radially to within ``limit`` (B,) of ``centre`` (B, 2)."""
    shape = (-1,) + (1,) * (p.ndim - 2)
    e = p - centre.reshape(shape + (2,))
    dist = np.hypot(e[..., 0], e[..., 1])
    scale = np.minimum(1.0, limit.reshape(shape) / np.maximum(dist, 1e-9))
    return centre.reshape(shape + (2,)) + e * scale[..., None]


def _on_trunks(pts, n, u1, u2):
    """Points on the trunks: trunk floor(8 u1), vertex 3 + floor(u2 (n - 2)) (past the disc).
    pts (B, 8, N+1, 2), n (B, 8); u1, u2 (B, K). Returns (B, K, 2)."""
    t = np.minimum(np.floor(u1 * 8).astype(np.int64), 7)
    nt = np.take_along_axis(n, t, 1)
    v = np.minimum(3 + np.floor(u2 * np.maximum(nt - 2, 1)).astype(np.int64), nt)
    flat = pts.reshape(pts.shape[0], -1, 2)
    idx = t * pts.shape[2] + v
    return np.take_along_axis(flat, np.broadcast_to(idx[..., None], idx.shape + (2,)), 1)


def _draw_chunk(start: int, grades: np.ndarray, size: int, seed: int, lesion_scale: float) -> _Chunk:
    """Draw images ``start .. start+B-1`` (grades (B,)): each from ``default_rng([seed, 1, i])``."""
    draws = [_image_draws(np.random.default_rng([seed, 1, start + j]), size) for j in range(grades.size)]
    d = {k: np.stack([x[k] for x in draws]) for k in draws[0]}
    return _geometry(d, np.asarray(grades, np.int64), size, lesion_scale)


# --------------------------------------------------------------------------------------- render


def _splat(out: np.ndarray, plane: np.ndarray, ox: np.ndarray, oy: np.ndarray, vals: np.ndarray) -> None:
    """Scatter-max patches into ``out`` (planes, H, W) float32 in place.

    plane (k,) int index into out's first axis; ox, oy (k,) int patch origins; vals (P, P, k)
    float32 indexed [y, x, patch] (the patch axis last keeps numpy's inner loops long). Pixels
    outside the frame are dropped.
    """
    _, H, W = out.shape
    ar = np.arange(vals.shape[0])
    xs = ox + ar[None, :, None]  # (1, P, k)
    ys = oy + ar[:, None, None]  # (P, 1, k)
    keep = (vals > 0) & (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
    idx = (plane * H + ys) * W + xs
    np.maximum.at(out.reshape(-1), idx[keep], vals[keep])


def _segment_coverage(segs: np.ndarray):
    """Pixel coverage of anti-aliased tapering line segments, in patches.

    segs float32 (S, 6+) rows x0, y0, x1, y1, hw0, hw1. Returns (ox, oy int (S,), cov float32
    (P, P, S) indexed [y, x, segment]): coverage = clip(max(hw, .5) + .5 - d, 0, 1) * min(1, 2 hw),
    with d the distance of the pixel centre to the segment and hw interpolated at the closest point.
    """
    x0, y0, x1, y1, h0, h1 = (np.ascontiguousarray(segs[:, i]) for i in range(6))
    margin = np.maximum(np.maximum(h0, h1), 0.5) + 0.5  # coverage is 0 beyond this distance
    ox = np.floor(np.minimum(x0, x1) - margin).astype(np.int64)
    oy = np.floor(np.minimum(y0, y1) - margin).astype(np.int64)
    ext = np.maximum(np.abs(x1 - x0), np.abs(y1 - y0)) + 2 * margin
    P = int(np.ceil(ext.max())) + 2
    ar = np.arange(P, dtype=_F)
    px = (ox - x0).astype(_F) + ar[None, :, None]  # (1, P, S): pixel minus segment start
    py = (oy - y0).astype(_F) + ar[:, None, None]  # (P, 1, S)
    vx, vy = x1 - x0, y1 - y0
    t = px * vx + py * vy
    t /= np.maximum(vx * vx + vy * vy, _F(1e-12))
    np.clip(t, 0, 1, out=t)
    ex = px - t * vx
    ey = py - t * vy
    ex *= ex
    ey *= ey
    ex += ey
    d = np.sqrt(ex, out=ex)
    hw = t * (h1 - h0)
    hw += h0
    cov = np.maximum(hw, _F(0.5))
    cov += _F(0.5)
    cov -= d
    np.clip(cov, 0, 1, out=cov)
    hw *= 2
    np.minimum(hw, 1, out=hw)
    cov *= hw
    return ox, oy, cov


def _blob_coverage(blobs: np.ndarray):
    """Pixel coverage of elliptic blobs, in patches.

    blobs float32 (L, 6+) rows x, y, a, b, theta, softness. Returns (ox, oy int (L,), cov float32
    (P, P, L) indexed [y, x, blob]): cov = clip((1 - rho) * r / s + .5, 0, 1) with rho the
    elliptic radius, r = sqrt(ab) and s = max(1, softness * r) the edge width in pixels (1 = an
    anti-aliased hard edge).
    """
    x, y, a, b, th, soft = (np.ascontiguousarray(blobs[:, i]) for i in range(6))
    r = np.sqrt(a * b)
    s = np.maximum(_F(1), soft * r)
    margin = np.maximum(a, b) * (1 + 0.5 * s / r)  # coverage is 0 beyond this distance
    ox = np.floor(x - margin).astype(np.int64)
    oy = np.floor(y - margin).astype(np.int64)
    P = int(np.ceil(2 * margin.max())) + 2
    ar = np.arange(P, dtype=_F)
    px = (ox - x).astype(_F) + ar[None, :, None]  # (1, P, L)
    py = (oy - y).astype(_F) + ar[:, None, None]  # (P, 1, L)
    c, sn = np.cos(th), np.sin(th)
    u = (px * c + py * sn) / a
    v = (py * c - px * sn) / b
    u *= u
    v *= v
    u += v
    rho = np.sqrt(u, out=u)
    cov = (1 - rho) * (r / s)
    cov += _F(0.5)
    return ox, oy, np.clip(cov, 0, 1, out=cov)


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of x (B, m, m) to (B, size, size), the m-point grid spanning the frame."""
    m = x.shape[1]
    pos = np.linspace(0, m - 1, size)
    i0 = np.minimum(np.floor(pos).astype(np.int64), m - 2)
    w = (pos - i0).astype(_F)
    rows = x[:, i0, :] * (1 - w)[None, :, None] + x[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w


def _render(c: _Chunk, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a chunk. Returns images uint8 (B, size, size, 3) and masks uint8 (B, size, size).

    Full-frame layers (retina, shading, macula, light, noise) are broadcast over (B, H, W); the
    disc, vessels and lesions are splatted from patches and composited at their pixels only. The
    image is built channel-first, (3, B, H, W), so numpy's inner loops run along rows. Steps:
    ``_retina``, ``_albedo``, ``_patches``, ``_composite``, ``_defocus``, ``_expose``.
    """
    G = {k: v[:, None, None] for k, v in c.g.items()}
    ex, ey, retina, t2 = _retina(G, size)
    img = _albedo(c, G, t2, size)
    optic, vess, les, cover = _patches(c, size)
    _composite(img, retina, optic, vess, les, c.g)
    img = _defocus(img, G["blur"][None])
    out = _expose(img, c.noise, G, ex, ey, retina, t2)
    masks = ((cover >= MASK_COVERAGE) & (retina >= 0.5)).astype(np.uint8)
    return out, masks


def _retina(G: dict[str, np.ndarray], H: int):
    """Pixel offsets ex, ey from the retina's centre, the retina's anti-aliased coverage and the squared
    radius in units of R (t2), each float32 (B, H, W). ``G``: the chunk's scalars shaped (B, 1, 1)."""
    yy, xx = np.mgrid[0:H, 0:H].astype(_F)
    ex, ey = xx - G["cx"], yy - G["cy"]
    r = np.sqrt(ex * ex + ey * ey)
    retina = np.minimum(np.maximum(G["R"] + _F(0.5) - r, 0), 1)
    t2 = r * r / (G["R"] * G["R"])
    return ex, ey, retina, t2


def _albedo(c: _Chunk, G: dict[str, np.ndarray], t2: np.ndarray, H: int) -> np.ndarray:
    """The bare retina, float32 (3, B, H, W): a warm base darkening towards the rim, low- and
    mid-frequency texture, a darker macula."""
    yy, xx = np.mgrid[0:H, 0:H].astype(_F)
    shade = (1 - G["edge"] * t2) * (1 + G["tlo"] * _upsample(c.tex_lo, H) + G["tmid"] * _upsample(c.tex_mid, H))
    mdx, mdy = xx - G["mx"], yy - G["my"]
    shade *= 1 - G["mstr"] * np.exp(-(mdx * mdx + mdy * mdy) / (G["mr"] * G["mr"]))
    return np.stack([shade * G["br"], shade * G["bg"], shade * G["bb"]])


def _patches(c: _Chunk, H: int):
    """Splat the chunk's patches: optic disc and cup (soft round blobs), vessels and neovascular tufts
    (segments), lesions and look-alikes (blobs).

    Returns optic (B, 2, H, W) (disc, cup), vess (B, 3, H, W) by segment channel, les (B, 7, H, W)
    by blob channel (coverage times opacity) and cover (B, H, W): the coverage by lesions (lesion
    blobs and neovascular segments), which makes the mask.
    """
    B = c.noise.shape[0]
    optic = _optic_disc(c.g, B, H)
    vess = np.zeros((B * 3, H, H), _F)
    les = np.zeros((B * 7, H, H), _F)
    cover = np.zeros((B, H, H), _F)
    if len(c.segs):
        ox, oy, cov = _segment_coverage(c.segs)
        ch = c.segs[:, 6].astype(np.int64)
        _splat(vess, c.seg_img * 3 + ch, ox, oy, cov)
        nv = ch == _NV
        if nv.any():
            _splat(cover, c.seg_img[nv], ox[nv], oy[nv], cov[..., nv])
    if len(c.blobs):
        ox, oy, cov = _blob_coverage(c.blobs)
        ch = c.blobs[:, 7].astype(np.int64)
        lesion = ch < _LESION_BLOBS
        _splat(cover, c.blob_img[lesion], ox[lesion], oy[lesion], cov[..., lesion])
        cov *= c.blobs[:, 6]
        _splat(les, c.blob_img * 7 + ch, ox, oy, cov)
    return optic.reshape(B, 2, H, H), vess.reshape(B, 3, H, H), les.reshape(B, 7, H, H), cover


def _optic_disc(g: dict[str, np.ndarray], B: int, H: int) -> np.ndarray:
    """Coverage of the optic discs (planes 2i) and their cups (planes 2i + 1), float32 (2B, H, W)."""
    discs = np.zeros((B, 8), _F)
    discs[:, 0], discs[:, 1], discs[:, 2], discs[:, 3], discs[:, 5] = g["dx"], g["dy"], g["dr"], g["dr"], 0.25
    cups = discs.copy()
    cups[:, 2] = cups[:, 3] = g["cup"] * g["dr"]
    cups[:, 5] = 0.5
    optic = np.zeros((B * 2, H, H), _F)
    ox, oy, cov = _blob_coverage(np.concatenate([discs, cups]))
    _splat(optic, np.concatenate([np.arange(B) * 2, np.arange(B) * 2 + 1]), ox, oy, cov)
    return optic


def _composite(img, retina, optic, vess, les, g: dict[str, np.ndarray]) -> None:
    """Paint the layers of ``_patches`` onto ``img`` (3, B, H, W) in place, back to front, weighted by
    the retina's coverage (``_layer``); vessels darken the local shade, everything else paints over."""
    B = optic.shape[0]
    paint = functools.partial(_layer, img.reshape(3, -1), retina.reshape(-1))
    paint(optic[:, 0], np.stack([g["dcr"], g["dcg"], g["dcb"]], -1))
    paint(optic[:, 1], (1.0, 0.95, 0.8), np.full(B, 0.7, _F))
    paint(les[:, _SHEEN], (1.0, 0.92, 0.82))
    paint(les[:, _PIG], (0.3, 0.14, 0.06))
    paint(les[:, _DRU], (0.95, 0.82, 0.5))
    paint(vess[:, _ARTERY], (0.66, 0.4, 0.45), g["aop"], multiply=True)
    paint(vess[:, _VEIN], (0.42, 0.2, 0.26), g["vop"], multiply=True)
    paint(vess[:, _NV], (0.62, 0.05, 0.07), np.full(B, 0.95, _F))
    paint(les[:, _HE], (0.34, 0.05, 0.04))
    paint(les[:, _MA], (0.36, 0.05, 0.04))
    paint(les[:, _CWS], (0.93, 0.88, 0.76))
    paint(les[:, _EX], (0.98, 0.88, 0.42))


def _layer(flat, inside, alpha, col, opacity=None, multiply=False) -> None:
    """Composite alpha (B, H, W) with colour col (3,) or (B, 3) at its non-zero pixels only.

    ``flat`` the image (3, B·H·W), changed in place; ``inside`` (B·H·W,) the retina's coverage, which
    weights alpha; ``opacity`` (B,) per image or None.
    """
    a = alpha.reshape(-1)
    nz = np.flatnonzero(a > 0)  # (a bool test first: nonzero on floats is slow)
    w = a[nz] * inside[nz]
    col = np.asarray(col, _F)
    if col.ndim == 2 or opacity is not None:
        b = nz // (alpha.shape[1] * alpha.shape[2])
        col = col[b].T if col.ndim == 2 else col[:, None]
        w = w * opacity[b] if opacity is not None else w
    else:
        col = col[:, None]
    if multiply:  # darken towards ``col`` times the background (vessels keep the local shade)
        flat[:, nz] *= 1 - w * (1 - col)
    else:  # paint ``col`` over
        sub = flat[:, nz]
        sub += w * (col - sub)
        flat[:, nz] = sub


def _defocus(img: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Separable 3-tap blur [b, 1 - 2b, b] of img (3, B, H, H) with edges repeated; b (1, B, 1, 1)."""
    H = img.shape[2]
    for axis in (2, 3):
        lo = np.concatenate([img.take([0], axis), img.take(np.arange(H - 1), axis)], axis)
        hi = np.concatenate([img.take(np.arange(1, H), axis), img.take([H - 1], axis)], axis)
        img = img * (1 - 2 * b) + (lo + hi) * b
    return img


def _expose(img, noise, G: dict[str, np.ndarray], ex, ey, retina, t2) -> np.ndarray:
    """Illumination (vignetting, a tilted light gradient, gain and colour cast), the dark frame outside
    the retina and sensor noise (``noise`` (B, 3, H, W)), then to uint8 (B, H, W, 3); uses img
    (3, B, H, W) as scratch."""
    _, B, H, _ = img.shape
    tilt = (ex * np.cos(G["psi"]) + ey * np.sin(G["psi"])) / G["R"]
    light = (255 * G["gain"]) * (1 - G["vig"] * t2) * (1 + G["grad"] * tilt) * retina
    dark = (1 - retina) * _F(255 * 0.012) + _F(0.5)
    grain = (255 * G["sigma"]) * (0.4 + 0.6 * retina)
    out = np.empty((B, H, H, 3), np.uint8)
    for k, cast in enumerate(("castr", "castg", "castb")):
        ch = img[k]
        ch *= light * G[cast]
        ch += dark
        ch += noise[:, k] * grain
        np.clip(ch, 0, 255, out=ch)
        out[..., k] = ch
    return out


def _render_range(task) -> tuple[int, np.ndarray, np.ndarray]:
    """Worker: draw and render images ``start .. start+len(grades)-1``."""
    start, grades, size, seed, lesion_scale = task
    images, masks = _render(_draw_chunk(start, grades, size, seed, lesion_scale), size)
    return start, images, masks


# ------------------------------------------------------------------------------------ generate


def _check(size, lesion_scale, workers) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"synthetic size = {size!r}: must be a whole number >= {MIN_SIZE}; set prepare.size")
    if not (isinstance(lesion_scale, (int, float, np.floating)) and 0 < lesion_scale <= 10):
        raise UserError(
            f"synthetic lesion_scale = {lesion_scale!r}: must be in (0, 10]; set prepare.synthetic.lesion_scale"
        )
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise UserError(f"workers = {workers!r}: must be a whole number >= 0 (0 = one per core); set prepare.workers")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _pool(procs: int):
    """A process pool for the numpy-only chunk renderer.

    Linux: ``fork`` (instant start, no re-import of the caller's ``__main__``, so scripts need
    no ``if __name__ == "__main__"`` guard). The children run numpy only, never torch, so a parent
    that holds torch/OpenMP threads is safe. Elsewhere (macOS fork is unsafe): ``spawn``.
    """
    import multiprocessing

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method).Pool(procs)


def iter_chunks(
    labels: np.ndarray,
    size: int = 64,
    seed: int = 0,
    lesion_scale: float = 1.0,
    workers: int = 0,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Render the images of ``labels`` (int (n,) grades) chunk by chunk, in order.

    Yields ``(start, images uint8 (b, size, size, 3), masks uint8 (b, size, size))`` for images
    ``start..start+b-1``. ``workers`` processes (0 = one per core; 1 = in this process) share the
    chunks; the bytes are the same for every ``workers``. Worker processes run numpy only
    (see ``_pool``).
    """
    _check_seed(seed)
    _check(size, lesion_scale, workers)
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    step = max(1, min(CHUNK, (1 << 22) // (size * size)))  # about 0.4 GB of float work arrays at most
    tasks = [(s, labels[s : s + step], int(size), int(seed), float(lesion_scale)) for s in range(0, n, step)]
    procs = min(workers or _cores(), len(tasks))
    from tqdm import tqdm

    with tqdm(
        total=n,
        desc=f"synthetic-fundus {size}px",
        unit="img",
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    ) as bar:
        if procs <= 1:
            for task in tasks:
                out = _render_range(task)
                bar.update(len(task[1]))
                yield out
            return
        with _pool(procs) as pool:
            for out in pool.imap(_render_range, tasks):
                bar.update(out[1].shape[0])
                yield out


def generate(
    n: int,
    size: int = 64,
    seed: int = 0,
    balance="uniform",
    lesion_scale: float = 1.0,
    workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` synthetic fundus images with grades and lesion masks.

    Grades follow ``class_counts(n, balance)`` exactly, in an order shuffled by ``seed``.
    Returns images uint8 (n, size, size, 3), labels int64 (n,) in 0..4, masks uint8
    (n, size, size) in {0, 1}. Same arguments give the same bytes, whatever ``workers``.
    """
    labels = make_labels(n, balance, seed)
    _check(size, lesion_scale, workers)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for start, im, mk in iter_chunks(labels, size, seed, lesion_scale, workers, progress):
        images[start : start + len(im)] = im
        masks[start : start + len(mk)] = mk
    return images, labels, masks


def prepare_synthetic(
    cfg: PrepareConfig,
    manifest_extra: dict[str, Any] | None = None,
    check: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> Path:
    """Generate ``cfg.synthetic.n`` images into ``data/prepared/<cfg.dataset>/`` and return it.

    Chunks stream into the writer's memory-mapped arrays, so only one chunk is held in RAM.
    The stratified split and the generator both use ``cfg.seed``. The folder is written
    atomically by ``store.DatasetWriter``. ``manifest_extra`` is added to the manifest; ``check`` is
    called with the finished images before the folder is put in place (its dict joins the manifest;
    raising leaves nothing written): the public set's disjointness check.
    """
    from dpcam.data import store
    from dpcam.layout import PREPARED_ROOT

    syn = cfg.synthetic
    labels = make_labels(syn.n, syn.balance, cfg.seed)
    fractions = cfg.split.model_dump()
    splits = store.stratified_split(labels, fractions, cfg.seed)
    counts = class_counts(syn.n, syn.balance)
    manifest = {
        "dataset": cfg.dataset,
        "kind": "prepared",
        "source": {"format": "synthetic"},
        "classes": list(CLASSES),
        "image_size": int(cfg.size),
        "seed": int(cfg.seed),
        "split_fractions": fractions,
        "generator": {
            "name": "synthetic-fundus",
            "version": GENERATOR_VERSION,
            "n": int(syn.n),
            "size": int(cfg.size),
            "seed": int(cfg.seed),
            "balance": syn.balance,
            "class_counts": {c: int(k) for c, k in zip(CLASSES, counts)},
            "lesion_scale": float(syn.lesion_scale),
            "lesion_counts": {
                c: {kind: [int(lo), int(hi)] for kind, (lo, hi) in zip(LESION_KINDS, LESION_COUNTS[g])}
                for g, c in enumerate(CLASSES)
            },
            "mask": f"union of pixels at least {MASK_COVERAGE:g} covered by a lesion",
        },
    }
    out = PREPARED_ROOT / cfg.dataset
    with store.DatasetWriter(out, syn.n, cfg.size, cfg.size, with_masks=True) as w:
        for start, im, mk in iter_chunks(labels, cfg.size, cfg.seed, syn.lesion_scale, cfg.workers, progress=True):
            w.images[start : start + len(im)] = im
            w.masks[start : start + len(mk)] = mk
        manifest.update(manifest_extra or {})
        if check is not None:
            manifest.update(check(w.images))
        return w.finish(labels, splits, manifest)


# ------------------------------------------------------------------------------------- figures


def sample_grid(
    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, per_grade: int = 4, scale: int | None = None
) -> Image.Image:
    """A sample grid: one row per grade, ``per_grade`` examples each as image + mask overlay.

    images uint8 (n, H, W, 3), labels int (n,), masks uint8 (n, H, W). Tiles are upscaled by
    ``scale`` with nearest neighbour (default: to about 128 px); in the overlay the image is dimmed
    and lesion pixels are cyan. Grades with fewer examples leave blank tiles.
    """
    from PIL import Image, ImageDraw, ImageFont

    images, labels, masks = np.asarray(images), np.asarray(labels), np.asarray(masks)
    H, W = images.shape[1:3]
    scale = scale or max(1, round(128 / H))
    th, tw = H * scale, W * scale
    gap, pair_gap, left, top = 4, 12, 130, 28
    cols = per_grade
    width = left + cols * (2 * tw + gap) + (cols - 1) * pair_gap + gap
    height = top + GRADES * (th + gap) + gap
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    for c in range(cols):
        x = left + c * (2 * tw + gap + pair_gap)
        draw.text((x + 2, 6), "image", fill=(220, 220, 220), font=font)
        draw.text((x + tw + gap + 2, 6), "lesion mask", fill=(220, 220, 220), font=font)
    for g in range(GRADES):
        y = top + g * (th + gap)
        draw.text((8, y + th // 2 - 8), CLASSES[g], fill=(235, 235, 235), font=font)
        for c, i in enumerate(np.flatnonzero(labels == g)[:cols]):
            x = left + c * (2 * tw + gap + pair_gap)
            im = images[i]
            m = masks[i].astype(bool)[..., None]
            over = np.where(m, np.array([0, 255, 255], np.uint8), (im * 0.45).astype(np.uint8))
            for k, tile in enumerate((im, over)):
                big = Image.fromarray(np.ascontiguousarray(tile)).resize((tw, th), Image.NEAREST)
                canvas.paste(big, (x + k * (tw + gap), y))
    return canvas


def save_sample_grid(
    path: str | Path = "docs/img/synthetic-grid.png",
    size: int = 64,
    per_grade: int = 4,
    seed: int = 0,
    lesion_scale: float = 1.0,
) -> Path:
    """Generate ``per_grade`` images of each grade and write their ``sample_grid`` PNG to ``path``."""
    from dpcam.layout import write_atomic

    images, labels, masks = generate(GRADES * per_grade, size, seed, "uniform", lesion_scale, workers=1)
    grid = sample_grid(images, labels, masks, per_grade)
    return write_atomic(Path(path), lambda tmp: grid.save(tmp, optimize=True))  # tmp keeps the suffix: same format


if __name__ == "__main__":  # python -m dpcam.data.synthetic [PNG] [SIZE]: regenerate the README grid
    out = save_sample_grid(
        *(sys.argv[1:2] or ["docs/img/synthetic-grid.png"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else [])
    )
    print(f"wrote {out}")
