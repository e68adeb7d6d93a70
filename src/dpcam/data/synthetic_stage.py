"""The synthetic-fundus shells: ``prepare`` of the built-in dataset into ``data/prepared/<dataset>/``
and the sample grid of the README (``python -m dpcam.data.synthetic_stage [PNG] [SIZE]``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpcam.data.raster import MASK_COVERAGE
from dpcam.data.synthetic import CLASSES, GENERATOR_VERSION, GRADES, class_counts, generate, iter_chunks, make_labels
from dpcam.data.synthetic_geometry import LESION_COUNTS, LESION_KINDS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from dpcam.config import PrepareConfig


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


if __name__ == "__main__":  # python -m dpcam.data.synthetic_stage [PNG] [SIZE]: regenerate the README grid
    out = save_sample_grid(
        *(sys.argv[1:2] or ["docs/img/synthetic-grid.png"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else [])
    )
    print(f"wrote {out}")
