"""Built-in dataset ``synthetic-fundus``: procedurally drawn colour fundus photographs with
diabetic-retinopathy-like lesions whose kinds and counts define grades 0-4 (APTOS scale), and a
binary lesion mask per image.

Each image is a dark frame holding a circular retina (warm orange-red albedo with low-frequency
texture and a darker macula), an optic disc with a pale cup near one side, a vessel tree (four
arcades of veins and arteries growing from the disc as jittered random walks with random branching
and tapering width), look-alikes that healthy eyes have too and that are not lesions (0-4 pigment
dots, 0-3 drusen, 0-2 patches of nerve-fibre sheen), defocus, illumination variation (vignetting,
a tilted light gradient, gain and colour cast) and sensor noise. Lesions by grade (counts are
drawn uniformly from ``synthetic_geometry.LESION_COUNTS``):

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
``raster.MASK_COVERAGE``; look-alikes are not in it.

Difficulty (measured, not a test): a small 4-block CNN trained without privacy on 3000 images at
64 px (uniform balance) reached 0.89 test accuracy at ``lesion_scale`` 1 (0.68 at 0.7, 0.82 at
0.85, 0.91 at 1.2, 0.95 at 1.5; 0.91 with 10000 images); its errors are mostly grade 0 vs 1.

Determinism: image ``i`` draws fixed-shape blocks of random numbers (``synthetic_geometry._DRAWS``) from its own
generator ``default_rng([seed, 1, i])``, the labels come from ``default_rng([seed, 0, n])``, and
rendering is element-wise numpy (no BLAS), so the bytes depend neither on ``workers`` nor on
``CHUNK``.

Speed: after the per-image draws, a chunk of images is built at once: the geometry of all vessel
trees and lesions by array operations over the chunk, vessel and neovascular segments as clipped
distance fields evaluated in small patches, blobs as elliptic distance fields in patches, both
scattered into the chunk with ``np.maximum.at`` and composited at their pixels only; full-frame
layers (retina, shading, macula, light, blur, noise) by broadcasting. Chunks go to a process pool.

This module holds the labels and the chunked, pooled generation; the draws and the chunk geometry are
in :mod:`dpcam.data.synthetic_geometry`, the rendering in :mod:`dpcam.data.raster`, the prepare shell
and the sample grid in :mod:`dpcam.data.synthetic_stage`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np

from dpcam.data.raster import _render
from dpcam.data.synthetic_geometry import _draw_chunk
from dpcam.errors import UserError

GRADES = 5
CLASSES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
APTOS_SHARES = (0.493, 0.101, 0.273, 0.053, 0.080)  # APTOS 2019 train.csv class shares, grades 0-4
GENERATOR_VERSION = 1
CHUNK = 32  # most images per unit of work (fewer for large sizes); the output does not depend on it
MIN_SIZE = 16


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


# ------------------------------------------------------------------------------------ generate


def _render_range(task) -> tuple[int, np.ndarray, np.ndarray]:
    """Worker: draw and render images ``start .. start+len(grades)-1``."""
    start, grades, size, seed, lesion_scale = task
    images, masks = _render(_draw_chunk(start, grades, size, seed, lesion_scale), size)
    return start, images, masks


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
