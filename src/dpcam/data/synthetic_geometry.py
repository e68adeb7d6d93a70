"""The random numbers of each synthetic-fundus image and the geometry of a chunk of images built
from them: retina, optic disc and macula, vessel trees, lesions and look-alikes, in pixels, as the
segment and blob rows of a :class:`_Chunk` (rendered by :mod:`dpcam.data.raster`).

Image ``i`` draws fixed-shape blocks (``_DRAWS``) from its own generator ``default_rng([seed, 1, i])``
(:func:`_draw_chunk`); everything after that is array operations over the whole chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

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
