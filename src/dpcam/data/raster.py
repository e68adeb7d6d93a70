"""Rendering a chunk of synthetic-fundus geometry (:mod:`dpcam.data.synthetic_geometry`) to uint8
images and binary lesion masks.

Segments and blobs become anti-aliased coverage in small patches, scattered into the chunk with
``np.maximum.at``; full-frame layers (retina, shading, macula, light, blur, noise) are broadcast;
everything is composited back to front at the pixels it covers (:func:`_render`).
"""

from __future__ import annotations

import functools

import numpy as np

from dpcam.data.synthetic_geometry import (
    _ARTERY,
    _CWS,
    _DRU,
    _EX,
    _F,
    _HE,
    _LESION_BLOBS,
    _MA,
    _NV,
    _PIG,
    _SHEEN,
    _VEIN,
    _Chunk,
)

MASK_COVERAGE = 0.25  # a pixel is a lesion pixel when a lesion covers at least this share of it


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
